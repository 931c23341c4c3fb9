"""Stage 2, analyse: aten graph -> residual streams -> blocks -> groups of identical blocks."""
