"""HuggingFace models as residual streams, for the eager Highway-BP oracle (oracle_general.py).

Each `view_<name>(model, inputs) -> (streams, head)` rebuilds the model's forward from its own
submodules (nothing from hbp_compile), in the form highway_backward_general takes:

- `streams`: one `(x0, steps)` per stream, x0 the output of the prelude (still attached to its
  graph), `steps` a list of `(block, residual)` with `zs = block(x_l)` a tuple and
  `x_{l+1} = residual(x_l, *zs)`;
- `head(states)`: the rest of the model from the states `[[x_0, ..., x_L]]` to the scalar loss
  that `model(**inputs).loss` returns.

`inputs` is the keyword dict the model is called with (`model(**inputs)`), labels included.
`stream_loss_general(*view(model, inputs))` equals `model(**inputs).loss` to float64 rounding
(tests/test_hf_models.py checks it). Dropout modules are called where the model calls them, so
with dropout probability 0 the views are deterministic; the oracle comparisons use 0.

Builders `build_<name>(...) -> (model, inputs)` make the tiny configurations the tests use
(random weights, train mode).
"""
import torch
import torch.nn.functional as F

V, S, B = 64, 8, 2          # vocabulary, tokens, batch


def add(x, z):
    """The identity residual."""
    return x + z


def ln_stats(s, eps):
    """LayerNorm's mean and 1 / sigma of s over the last axis (biased variance)."""
    mu = s.mean(-1, keepdim=True)
    var = (s - mu).pow(2).mean(-1, keepdim=True)
    return mu, torch.rsqrt(var + eps)


def post_ln_step(branch, ln):
    """LN(x + branch(x)) in the paper's algebra: zs = (z, mu, rstd) of x + z, K = diag(w * rstd)."""
    def block(x):
        z = branch(x)
        return (z, *ln_stats(x + z, ln.eps))

    def residual(x, z, mu, rstd):
        return (x + z - mu) * rstd * ln.weight + ln.bias

    return block, residual


def causal_lm_loss(logits, labels):
    """transformers.loss.ForCausalLMLoss with its defaults: logits upcast with .float() (in
    float64 that is a cast to float32, as HF does), labels shifted left, -100 ignored, mean."""
    logits = logits.float()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), shifted.reshape(-1),
                           ignore_index=-100)


def classification_loss(logits, labels):
    """ForSequenceClassificationLoss for integer labels and num_labels > 1: mean cross-entropy."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


def _ids(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g)


def _pixels(seed, dtype, size):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3, size, size, generator=g, dtype=dtype),
            torch.randint(0, 5, (B,), generator=g))


def _finish(model, dtype):
    return model.to(dtype).train()


# -----------------------------------------------------------------------------
# builders


def build_gpt2(n_layer=2, drop=0.0, attn="eager", dtype=torch.float64, seed=0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=V, n_positions=32,
                       resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop, use_cache=False,
                       attn_implementation=attn)
    ids = _ids(seed + 1)
    return _finish(T.GPT2LMHeadModel(cfg), dtype), {"input_ids": ids, "labels": ids}


def build_llama(n_layer=2, drop=0.0, attn="eager", dtype=torch.float64, seed=0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                        max_position_embeddings=64, attention_dropout=drop, use_cache=False,
                        attn_implementation=attn)
    ids = _ids(seed + 1)
    return _finish(T.LlamaForCausalLM(cfg), dtype), {"input_ids": ids, "labels": ids}


def build_bert(n_layer=2, drop=0.0, attn="eager", dtype=torch.float64, seed=0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=n_layer,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                       hidden_dropout_prob=drop, attention_probs_dropout_prob=drop,
                       attn_implementation=attn)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, ::3] = -100                       # the usual MLM labels: most positions ignored
    return _finish(T.BertForMaskedLM(cfg), dtype), {"input_ids": ids, "labels": labels}


def build_vit(n_layer=2, drop=0.0, attn="eager", dtype=torch.float64, seed=0):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                      num_hidden_layers=n_layer, num_attention_heads=2, intermediate_size=64,
                      num_labels=5, hidden_dropout_prob=drop, attention_probs_dropout_prob=drop,
                      attn_implementation=attn)
    px, y = _pixels(seed + 1, dtype, 16)
    return _finish(T.ViTForImageClassification(cfg), dtype), {"pixel_values": px, "labels": y}


def build_resnet(depths=(2, 2), dtype=torch.float64, seed=0):
    """Basic layers; embedding_size == hidden_sizes[0], so stage 0 has no projection shortcut."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16][:len(depths)],
                         depths=list(depths), layer_type="basic", num_labels=5)
    px, y = _pixels(seed + 1, dtype, 32)
    return _finish(T.ResNetForImageClassification(cfg), dtype), {"pixel_values": px, "labels": y}


def build_mamba(n_layer=2, dtype=torch.float32, seed=0, **cfg_overrides):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.MambaConfig(vocab_size=V, hidden_size=32, state_size=4, num_hidden_layers=n_layer,
                        expand=2, conv_kernel=4, use_cache=False, **cfg_overrides)
    ids = _ids(seed + 1)
    return _finish(T.MambaForCausalLM(cfg), dtype), {"input_ids": ids, "labels": ids}


# -----------------------------------------------------------------------------
# views


def view_gpt2(model, inputs):
    """x_0 = drop(wte + wpe); per layer attn(ln_1(x)) then mlp(ln_2(x)); head ln_f, lm_head."""
    from transformers.masking_utils import create_causal_mask

    tr, ids, labels = model.transformer, inputs["input_ids"], inputs["labels"]
    pos = torch.arange(ids.size(1)).unsqueeze(0)
    emb = tr.wte(ids)
    x0 = tr.drop(emb + tr.wpe(pos))
    mask = create_causal_mask(config=tr.config, inputs_embeds=emb, attention_mask=None,
                              cache=None, position_ids=pos)
    steps = []
    for blk in tr.h:
        steps.append((lambda x, b=blk: (b.attn(b.ln_1(x), attention_mask=mask)[0],), add))
        steps.append((lambda x, b=blk: (b.mlp(b.ln_2(x)),), add))

    def head(states):
        return causal_lm_loss(model.lm_head(tr.ln_f(states[0][-1])), labels)

    return [(x0, steps)], head


def view_llama(model, inputs):
    """x_0 = embed_tokens; per layer self_attn(input_layernorm(x)) with the rotary embeddings
    and causal mask LlamaModel.forward builds, then mlp(post_attention_layernorm(x))."""
    from transformers.masking_utils import create_causal_mask

    m, ids, labels = model.model, inputs["input_ids"], inputs["labels"]
    x0 = m.embed_tokens(ids)
    pos = torch.arange(ids.size(1)).unsqueeze(0)
    mask = create_causal_mask(config=m.config, inputs_embeds=x0, attention_mask=None,
                              cache=None, position_ids=pos)
    rope = m.rotary_emb(x0, position_ids=pos)
    steps = []
    for layer in m.layers[: m.config.num_hidden_layers]:
        def attn(x, lay=layer):
            return (lay.self_attn(hidden_states=lay.input_layernorm(x), attention_mask=mask,
                                  position_ids=pos, position_embeddings=rope)[0],)

        steps.append((attn, add))
        steps.append((lambda x, lay=layer: (lay.mlp(lay.post_attention_layernorm(x)),), add))

    def head(states):
        return causal_lm_loss(model.lm_head(m.norm(states[0][-1])), labels)

    return [(x0, steps)], head


def view_vit(model, inputs):
    """Pre-LN: x_0 = embeddings (cls token, patches, positions, dropout); per layer
    dropout(attention(layernorm_before(x))) then dropout(mlp(layernorm_after(x)))."""
    from transformers.masking_utils import create_bidirectional_mask

    vit = model.vit
    px = inputs["pixel_values"].to(vit.embeddings.patch_embeddings.projection.weight.dtype)
    x0 = vit.embeddings(px)
    mask = create_bidirectional_mask(config=vit.config, inputs_embeds=x0, attention_mask=None)
    steps = []
    for layer in vit.layers:
        def attn(x, lay=layer):
            return (lay.dropout(lay.attention(lay.layernorm_before(x), mask)[0]),)

        steps.append((attn, add))
        steps.append((lambda x, lay=layer: (lay.dropout(lay.mlp(lay.layernorm_after(x))),), add))

    def head(states):
        logits = model.classifier(vit.layernorm(states[0][-1])[:, 0, :])
        return classification_loss(logits, inputs["labels"])

    return [(x0, steps)], head


def view_bert(model, inputs):
    """Post-LN in the paper's algebra. x_0 = embeddings (their LayerNorm and dropout: prelude);
    per layer LN(x + dropout(dense(self_attn(x)))) then LN(x + dropout(dense(ffn(x))))."""
    from transformers.masking_utils import create_bidirectional_mask

    bert = model.bert
    x0 = bert.embeddings(input_ids=inputs["input_ids"])
    assert not bert.config.is_decoder
    mask = create_bidirectional_mask(config=bert.config, inputs_embeds=x0, attention_mask=None)
    steps = []
    for layer in bert.encoder.layer:
        att, out = layer.attention, layer.output

        def attn_branch(x, att=att):
            return att.output.dropout(att.output.dense(att.self(x, attention_mask=mask)[0]))

        def ffn_branch(x, lay=layer):
            return lay.output.dropout(lay.output.dense(lay.intermediate(x)))

        steps.append(post_ln_step(attn_branch, att.output.LayerNorm))
        steps.append(post_ln_step(ffn_branch, out.LayerNorm))

    def head(states):
        logits = model.cls(states[0][-1])
        return F.cross_entropy(logits.view(-1, logits.size(-1)), inputs["labels"].view(-1))

    return [(x0, steps)], head


def view_resnet(model, inputs):
    """One stream through every layer of every stage: residual relu(x + z) with z the layer's
    conv-BN-relu-conv-BN path, and at a stage's first layer relu(shortcut(x) + z), the
    projection (conv + BN) inside the residual function, so that the oracle's scan applies its
    dense K_l^T = d relu(P(x) + z) / dx by autograd; x_0 = the embedder (stem conv, max-pool).
    BatchNorm is in train mode: each block and shortcut is called once per pass, like forward.
    """
    r = model.resnet
    x0 = r.embedder(inputs["pixel_values"])
    steps = []
    for st in r.encoder.stages:
        for lay in st.layers:
            if isinstance(lay.shortcut, torch.nn.Identity):
                residual = (lambda x, z, lay=lay: lay.activation(x + z))
            else:
                residual = (lambda x, z, lay=lay: lay.activation(z + lay.shortcut(x)))
            steps.append((lambda x, lay=lay: (lay.layer(x),), residual))

    def head(states):
        logits = model.classifier(r.pooler(states[0][-1]))
        return classification_loss(logits, inputs["labels"])

    return [(x0, steps)], head


def view_mamba(model, inputs):
    """x_0 = embeddings; per layer mixer(norm(x)) (identity residual; valid where
    residual_in_fp32 is off or the model is float32 so its cast is a no-op); head norm_f,
    lm_head (logits .float()), causal LM loss."""
    bb = model.backbone
    x0 = bb.embeddings(inputs["input_ids"])
    assert not bb.layers[0].residual_in_fp32 or x0.dtype == torch.float32
    steps = [(lambda x, lay=lay: (lay.mixer(lay.norm(x.to(lay.norm.weight.dtype))),), add)
             for lay in bb.layers]

    def head(states):
        logits = model.lm_head(bb.norm_f(states[0][-1]).to(model.lm_head.weight.dtype)).float()
        return causal_lm_loss(logits, inputs["labels"])

    return [(x0, steps)], head


VIEWS = {"gpt2": view_gpt2, "llama": view_llama, "vit": view_vit, "bert": view_bert,
         "resnet": view_resnet, "mamba": view_mamba}
BUILDERS = {"gpt2": build_gpt2, "llama": build_llama, "vit": build_vit, "bert": build_bert,
            "resnet": build_resnet, "mamba": build_mamba}
