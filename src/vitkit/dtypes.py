"""Floating-point dtypes by name: one parser for every ``*_dtype`` argument and config value."""

from __future__ import annotations

import torch

from vitkit.errors import ConfigError

__all__ = ["FLOAT_DTYPES", "parse_dtype"]

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(value: str | torch.dtype | None, what: str = "dtype", extra: tuple[str, ...] = ()
                ) -> torch.dtype | str | None:
    """``None``, a float ``torch.dtype`` or its name (``"bf16"``, ``"bfloat16"``, ``"torch.float16"``, ``"fp32"``...)
    -> the dtype (None stays None). ``extra`` names other accepted strings, returned lower-cased (e.g. ``"input"``).

    Raises:
        ConfigError: an unknown name or a non-float dtype, naming ``what`` and the accepted values.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value not in FLOAT_DTYPES.values():
            raise ConfigError(f"{what} {value} is not a float dtype; expected bf16, fp16 or fp32")
        return value
    key = str(value).lower().removeprefix("torch.")
    if key in extra:
        return key
    if key not in FLOAT_DTYPES:
        choices = ", ".join(["None", *(repr(e) for e in extra), "'bf16', 'fp16' or 'fp32'"])
        raise ConfigError(f"unknown {what} {value!r}; expected {choices} (also 'bfloat16', 'float16', 'half', "
                          f"'float32', 'float'). Set {what} to one of them instead of {what}={value!r}.")
    return FLOAT_DTYPES[key]
