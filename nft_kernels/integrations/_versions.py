"""Tested version ranges of the peer packages, checked on import of an adapter."""
from __future__ import annotations

import os
from importlib import metadata

# package -> (lowest tested, first untested), the same bounds as the extras in pyproject.toml
TESTED = {"trl": ("1.8.0", "1.17"), "verl": ("0.9.1", "0.10")}
ESCAPE = "NFT_KERNELS_ALLOW_UNTESTED"


def _key(version: str) -> tuple:
    from packaging.version import Version

    return Version(version)


def check_version(package: str, installed: str | None = None) -> str:
    """Return the installed version of ``package``, or raise ImportError in one readable line
    when it is missing or outside the tested range (``NFT_KERNELS_ALLOW_UNTESTED=1`` downgrades
    the range check to a warning)."""
    low, high = TESTED[package]
    if installed is None:
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise ImportError(f"nft_kernels.integrations.{package} needs {package} "
                              f"(>={low},<{high}); install it with: pip install "
                              f"'nft-kernels[{package}]'") from None
    if not _key(low) <= _key(installed) < _key(high):
        message = (f"nft_kernels.integrations.{package} is tested with {package}>={low},<{high}, "
                   f"found {package} {installed}; install a tested one with: pip install "
                   f"'nft-kernels[{package}]' (or set {ESCAPE}=1 to try this one anyway)")
        if os.environ.get(ESCAPE, "") not in ("", "0"):
            import warnings
            warnings.warn(message, stacklevel=3)
        else:
            raise ImportError(message)
    return installed
