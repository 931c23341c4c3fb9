"""Options of the Highway-BP pass: one frozen dataclass, validated once, hashed into cache keys."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

CODEGENS = ("inductor", "eager")
SCANS = ("auto", "sequential", "chunked", "log-depth", "op")      # rewrite.scan.choose_scan
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class HBPError(RuntimeError):
    """Raised in strict mode where the pass would otherwise fall back to exact backprop."""


@dataclasses.dataclass(frozen=True)
class HBPConfig:
    """Everything that changes the graphs the pass emits (and so belongs in a cache key)."""

    iters: int = 3                  # k: rounds of block VJPs after round 0
    gamma: float = 0.0              # the paper's gamma split (0 = plain Highway-BP)
    codegen: str = "inductor"       # "inductor" or "eager" (aot_autograd, no codegen)
    strict: bool = False            # raise instead of falling back to exact backprop
    batched: object = "auto"        # one VJP per group per round: True, False, or "auto"
    min_length: int = 2             # shortest stream to rewrite (a lone add is often no residual)
    scan: str = "auto"              # diagonal scan: "sequential", "log-depth", or by length
    recompute: bool = False         # rerun blocks' forward in the backward instead of saving
    fold: bool = True               # fold norm affine weights into the final VJP's dW
    mode: Optional[str] = None      # torch.compile's mode for Inductor ("reduce-overhead": CUDA graphs)
    inductor_options: tuple = ()    # Inductor config patches, (key, value) pairs (a dict is accepted)
    rnn_modules: bool = True        # trace nn.RNN/GRU/LSTM (Dynamo's allow_rnn, for hbp frames only)
    rnn_time_chunks: object = "auto"  # runs of time steps of an RNN layer's cell VJPs: int or "auto"
    exclude: tuple = ()             # fnmatch patterns of module paths whose blocks stay exact
    exact_first: int = 0            # the first N blocks of every stream stay exact
    exact_last: int = 0             # the last N blocks of every stream stay exact
    dump_dir: Optional[str] = None  # where to write graphs and reports (not in the cache key)

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"hbp_backend: iters must be a non-negative int, got {self.iters!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) \
                or not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"hbp_backend: gamma must be a number in [0, 1], got {self.gamma!r}")
        if self.codegen not in CODEGENS:
            raise ValueError(f"hbp_backend: codegen must be one of {CODEGENS}, got {self.codegen!r}")
        if self.batched != "auto" and not isinstance(self.batched, bool):
            raise ValueError(f"hbp_backend: batched must be a bool or 'auto', got {self.batched!r}")
        for name in ("strict", "recompute", "fold", "rnn_modules"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"hbp_backend: {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.min_length, bool) or not isinstance(self.min_length, int) or self.min_length < 1:
            raise ValueError(f"hbp_backend: min_length must be an int >= 1, got {self.min_length!r}")
        for name in ("exact_first", "exact_last"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"hbp_backend: {name} must be an int >= 0, got {n!r}")
        n = self.rnn_time_chunks
        if n != "auto" and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"hbp_backend: rnn_time_chunks must be an int >= 1 or 'auto', got {n!r}")
        if self.scan not in SCANS:
            raise ValueError(f"hbp_backend: scan must be one of {SCANS}, got {self.scan!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"hbp_backend: dump_dir must be a path or None, got {self.dump_dir!r}")
        object.__setattr__(self, "gamma", float(self.gamma))
        if self.mode not in MODES:
            raise ValueError(f"hbp_backend: mode must be one of {MODES}, got {self.mode!r}")
        opts = self.inductor_options
        if isinstance(opts, dict):
            opts = tuple(sorted(opts.items()))
        if not isinstance(opts, tuple) or not all(isinstance(k, str) for k, _ in opts):
            raise ValueError("hbp_backend: inductor_options must be a dict of Inductor config "
                             f"names to values, got {self.inductor_options!r}")
        from torch._inductor import config as inductor_config
        known = inductor_config.get_config_copy()
        bad = [k for k, _ in opts if k not in known]
        if bad:
            raise ValueError(f"hbp_backend: inductor_options: {bad[0]!r} is no Inductor config "
                             f"option (torch._inductor.config)")
        object.__setattr__(self, "inductor_options", opts)
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        if not isinstance(exclude, (tuple, list)) or not all(isinstance(p, str) for p in exclude):
            raise ValueError("hbp_backend: exclude must be module-path patterns (a str or a "
                             f"list of str, fnmatch style, e.g. 'h.0.*'), got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(exclude))

    @classmethod
    def from_options(cls, options: dict) -> "HBPConfig":
        """The config of `options` (name -> value); an unknown name is a ValueError naming it."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise ValueError(f"hbp_backend: unknown option {unknown[0]!r}; the options are "
                             f"{', '.join(names)}")
        return cls(**options)

    def inductor_patches(self) -> dict:
        """Inductor config patches for `mode` (as torch.compile sets them) and the options."""
        patches = {}
        if self.mode not in (None, "default"):
            from torch._inductor import list_mode_options
            patches.update(list_mode_options(self.mode))
        patches.update(dict(self.inductor_options))
        return patches

    def cache_key(self) -> str:
        """Hash of every option that changes the emitted graphs."""
        fields = dataclasses.asdict(self)
        fields.pop("dump_dir")
        return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]
