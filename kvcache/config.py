"""Settings of a compressed KV cache (GEAR or KIVI), validated once and shared by the cache, the pass and the
benchmark. Checks that need the model's shapes (head_dim, number of layers) live in `check_against_model`."""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..strict_config import StrictConfig

GEAR_DEFAULTS = {"key_rank": 2, "value_rank": 2, "outlier_ratio": 0.02}
KIVI_DEFAULTS = {"key_rank": 0, "value_rank": 0, "outlier_ratio": 0.0}

SUPPORTED_BITS = (2, 3, 4, 8)


class KVCacheSettings(StrictConfig):
    """How each attention layer's keys and values are stored.

    - `bits`: code width (2, 3, 4 or 8); keys are quantized per channel in groups of `group_size` tokens, values per
      token in groups of `group_size` channels (the KIVI layout). `value_bits`: the values' width where it differs
      (KIVI's k_bits / v_bits: keys usually need more bits than values).
    - `residual_length`: tokens kept in an fp16 window; when it fills, that chunk is compressed and appended.
    - GEAR only: `outlier_ratio` s: in every quantization group the max(1, round(s*G/2)) largest and as many
      smallest entries are kept exactly as sparse outliers (so at G=64 any s <= 0.047 keeps 2/64 = 3.1%, see
      kernels.kv_quant.outlier_fraction; fp16 value + uint8 offset in the group each); the remaining error is
      approximated by a rank-r term per page (a span of `page_chunks` chunks) and KV head: one orthonormal channel
      basis per page and fp16 token factors (`key_rank`/`value_rank` for pages opened after the prompt,
      `key_prefill_rank`/`value_prefill_rank` for the prompt's pages; None = same as the decode rank; a page keeps
      the rank it was opened with), found by `power_iters` power iterations.
    - `page_chunks`: chunks per page of the paged storage (compress.kernels.kv_pages, format version 2);
      `lowrank_dtype`: storage of the low-rank token factors (fp8 e4m3 halves their cost).
    - `scale_format`: storage of each quantization group's scale: fp16 (KIVI's and GEAR's own) or log8, one byte
      (2^(u/8 - 17), the step searched per group: 0.125 bit per element less at G=64, and on builtin:small a lower
      KL than fp16 min-max at 2 and 3 bits; compress.kernels.kv_scale).
    - `skip_layers`: layer indices kept in an uncompressed cache."""

    model_config = ConfigDict(validate_assignment=True)  # strict, unknown keys refused: StrictConfig

    method: Literal["gear", "kivi"] = Field("gear", description="gear: codes + low-rank error + sparse outliers; "
                                            "kivi: codes only (its rank and outlier defaults are 0)")
    bits: int = Field(4, description="code width per entry: 2, 3, 4 or 8")
    value_bits: int | None = Field(None, description="code width of the values when it differs from the keys' "
                                                     "(KIVI's k_bits / v_bits; None: bits)")
    group_size: int = Field(64, ge=1, description="entries per quantization group (keys: tokens per channel, values: "
                                                  "channels per token); must divide head_dim")
    residual_length: int = Field(64, ge=1, description="recent tokens kept uncompressed; when full, the chunk is "
                                                       "compressed (a multiple of group_size)")
    # rank and outlier defaults depend on `method` (GEAR_DEFAULTS / KIVI_DEFAULTS)
    key_rank: int = Field(2, ge=0, description="rank of the low-rank error term on keys (chunks after the prompt)")
    value_rank: int = Field(2, ge=0, description="rank of the low-rank error term on values (chunks after the prompt)")
    key_prefill_rank: int | None = Field(None, ge=0, description="key rank for the prompt's chunks (None: key_rank)")
    value_prefill_rank: int | None = Field(None, ge=0,
                                           description="value rank for the prompt's chunks (None: value_rank)")
    outlier_ratio: float = Field(0.02, ge=0.0, lt=0.5, description="share of each group's largest and smallest "
                                                                   "entries kept exactly as sparse outliers")
    power_iters: int = Field(3, ge=1, description="power iterations that find the low-rank term")
    page_chunks: int = Field(32, ge=1, description="compressed chunks per storage page")
    lowrank_dtype: Literal["float16", "float8_e4m3fn"] = Field("float16", description="storage of the low-rank "
                                                               "token factors (fp8 e4m3 halves their cost)")
    scale_format: Literal["fp16", "log8"] = Field("fp16", description="storage of each group's scale: fp16, or log8 "
                                                  "(one byte, the step searched per group; 0.125 bit/element less)")
    skip_layers: list[int] = Field(default_factory=list, description="layer indices kept in an uncompressed cache")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        if isinstance(data, dict):
            defaults = KIVI_DEFAULTS if data.get("method") == "kivi" else GEAR_DEFAULTS
            data = {**defaults, **{k: v for k, v in data.items() if v is not None or k not in defaults}}
        return data

    @model_validator(mode="after")
    def _check(self) -> "KVCacheSettings":
        for name, b in (("bits", self.bits), ("value_bits", self.value_bits)):
            if b is not None and b not in SUPPORTED_BITS:
                raise ValueError(f"{name}={b} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.residual_length % self.group_size:
            raise ValueError(f"residual_length ({self.residual_length}) must be a multiple of group_size "
                             f"({self.group_size}): keys are quantized in groups of group_size tokens per chunk")
        if self.method == "kivi" and (self.outlier_ratio or self.key_rank or self.value_rank
                                      or self.key_prefill_rank or self.value_prefill_rank):
            raise ValueError("method 'kivi' has no outliers and no low-rank term: set outlier_ratio: 0 and the ranks "
                             "to 0, or use method 'gear'")
        return self

    @classmethod
    def build(cls, **kwargs) -> "KVCacheSettings":
        """Construct from keyword arguments; a bad value raises ConfigError (a user mistake) with what to fix."""
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            msgs = [f"{'.'.join(map(str, e['loc'])) or 'kv cache'}: {e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()]
            raise ConfigError("; ".join(msgs)) from exc

    def bits_of(self, kind: str) -> int:
        """Code width of keys ("key") or values ("value")."""
        return self.value_bits if kind == "value" and self.value_bits is not None else self.bits

    def rank(self, kind: str, prefill: bool) -> int:
        decode = self.key_rank if kind == "key" else self.value_rank
        pre = self.key_prefill_rank if kind == "key" else self.value_prefill_rank
        return decode if (not prefill or pre is None) else pre

    def check_against_model(self, head_dim: int, num_layers: int | None = None) -> None:
        """Raise ConfigError for settings this model's attention shapes cannot take."""
        from .kernel_api import outliers_per_side

        if 2 * outliers_per_side(self.outlier_ratio, self.group_size) >= self.group_size:
            raise ConfigError(f"outlier_ratio {self.outlier_ratio} would set aside every entry of a group of "
                              f"{self.group_size}: use a smaller outlier_ratio")
        if self.group_size > 256 and outliers_per_side(self.outlier_ratio, self.group_size):
            # an outlier's place in its group is stored in one byte (kv_pages.py): past 256 it would wrap
            raise ConfigError(f"group_size {self.group_size} with outliers: an outlier's offset in its group is stored "
                              "in one byte, so with outlier_ratio > 0 group_size can be at most 256")
        if head_dim % self.group_size:
            raise ConfigError(f"group_size {self.group_size} must divide head_dim {head_dim} (values are quantized "
                              f"per token in groups of group_size channels); try group_size {head_dim} or a divisor")
        for b in {self.bits, self.bits_of("value")}:
            if (head_dim * b) % 8 or (b == 3 and head_dim % 8):
                raise ConfigError(f"head_dim {head_dim} cannot be packed at {b} bits (needs a multiple of 8 codes)")
        for kind in ("key", "value"):
            for prefill in (False, True):
                r = self.rank(kind, prefill)
                if r > min(head_dim, self.residual_length):
                    raise ConfigError(f"{kind} rank {r} exceeds min(head_dim={head_dim}, residual_length="
                                      f"{self.residual_length}); choose a rank <= {min(head_dim, self.residual_length)}")
        if num_layers is not None:
            bad = [i for i in self.skip_layers if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"skip_layers {bad} out of range: the model has layers 0..{num_layers - 1}")
