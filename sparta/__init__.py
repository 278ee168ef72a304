"""sparta: sparse adversarial training in PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "load_config", "train", "create_model"]


def __getattr__(name: str):
    # lazy: `import sparta` stays cheap and the CLI imports torch only when it needs it
    if name == "load_model":
        from .experiment import load_model  # noqa: PLC0415 (CLI start-up: `import sparta` loads no submodule)
        return load_model
    if name == "train":
        from .experiment import train  # noqa: PLC0415 (CLI start-up: `import sparta` loads no submodule)
        return train
    if name == "load_config":
        from .config import load_config  # noqa: PLC0415 (CLI start-up: `import sparta` loads no submodule)
        return load_config
    if name == "create_model":
        from .models import create_model  # noqa: PLC0415 (CLI start-up: `import sparta` loads no submodule)
        return create_model
    raise AttributeError(f"module 'sparta' has no attribute {name!r}")
