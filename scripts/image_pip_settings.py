"""The `podman build` arguments that give deploy/Dockerfile this machine's pip settings.

    python3 scripts/image_pip_settings.py WORK_DIR PYTHON_TAG      (PYTHON_TAG: the base image's, e.g. cp311)

Prints one argument a line:
- `--secret=id=pip.conf,src=WORK_DIR/pip.conf`: what `pip config list` shows here (/etc/pip.conf,
  /etc/xdg/pip, the user's file, PIP_* variables) merged into one file, the CA line left out;
- `--secret=id=pip-ca,src=FILE`: the CA bundle pip is told to use (`cert`, else REQUESTS_CA_BUNDLE
  or SSL_CERT_FILE), for a TLS-intercepting proxy;
- `--volume=PATH:PATH:ro` for each local path those settings name (find-links folders, file://
  indexes with their parent folder, constraint files), so that they mean the same inside the build;
- `--build-arg=TORCH_VERSION=...` (and TORCHVISION_VERSION, TORCH_INDEX) when CPU torch and torchvision
  wheels for PYTHON_TAG lie in a find-links folder; else the Dockerfile's default (PyTorch's CPU
  index) when that answers, else `--build-arg=TORCH_INDEX=<the configured index>`: CUDA torch.
Nothing is printed for a setting this machine does not have. Standard library only.
"""
from __future__ import annotations

import ast
import os
import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

PATH_KEYS = ("find-links", "constraint", "requirement", "index-url", "extra-index-url")
CA_KEY = "cert"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # deploy/Dockerfile's TORCH_INDEX default
# torchvision 0.N pairs with torch 2.(N-15): 0.28 <-> 2.13, 0.29 <-> 2.14 (pytorch/vision's table)
TORCHVISION_MINOR_OFFSET = 15


def pip_settings() -> dict[tuple[str, str], str]:
    """{(section, key): value} as pip sees them, environment variables last (they win)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                            capture_output=True, text=True, check=True).stdout
    settings: dict[tuple[str, str], str] = {}
    for line in sorted(listed.splitlines(), key=lambda l: l.startswith(":env:")):
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        section = "global" if section in (":env:", "") else section
        if key != "config-file":
            settings[(section, key)] = ast.literal_eval(value)
    return settings


def local_paths(value: str) -> list[str]:
    """The existing local paths a find-links / index / constraint value names (file:// URLs included)."""
    paths = [v.removeprefix("file://") for v in value.split() if v.startswith(("/", "file:///"))]
    return [p for p in paths if os.path.exists(p)]


def cpu_wheels(find_links: list[str], name: str, python_tag: str) -> set[tuple[int, int, int]]:
    """Versions of the `name`-X.Y.Z+cpu wheels for python_tag in those folders."""
    pattern = re.compile(rf"{name}-(\d+)\.(\d+)\.(\d+)\+cpu-{python_tag}-")
    return {tuple(int(v) for v in m.groups()) for folder in find_links if os.path.isdir(folder)
            for wheel in Path(folder).glob(f"{name}-*+cpu-*.whl") if (m := pattern.match(wheel.name))}


def cpu_torch(find_links: list[str], python_tag: str) -> tuple[str, str] | None:
    """(torch, torchvision) versions of the newest CPU pair there. A CPU torch alone is no use: PyPI's
    torchvision is built against CUDA torch and fails to import beside a CPU one (torchvision::nms)."""
    vision = cpu_wheels(find_links, "torchvision", python_tag)
    pairs = [(t, (0, t[1] + TORCHVISION_MINOR_OFFSET, t[2])) for t in cpu_wheels(find_links, "torch", python_tag)]
    pairs = [pair for pair in pairs if pair[1] in vision]
    if not pairs:
        return None
    torch, torchvision = max(pairs)
    return "{}.{}.{}+cpu".format(*torch), "{}.{}.{}+cpu".format(*torchvision)


def reachable(url: str, ca: str | None) -> bool:
    """Whether `url` answers within 10 s (the CA as pip would use it)."""
    context = ssl.create_default_context(cafile=ca) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=10, context=context):
            return True
    except (OSError, ValueError):
        return False


def main(work: Path, python_tag: str) -> list[str]:
    settings = pip_settings()
    ca = settings.pop(("global", CA_KEY), None) or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
    args, mounts = [], []
    for (section, key), value in settings.items():
        if key in PATH_KEYS:
            paths = local_paths(value)
            if key.endswith("index-url"):  # a PEP 503 folder links its files relative to its parent (../../files)
                paths = [str(Path(p).parent) for p in paths]
            mounts += [p for p in paths if p not in mounts]
    if settings:
        conf = work / "pip.conf"
        sections = sorted({s for s, _ in settings})
        conf.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for (t, k), v in settings.items() if t == s)
                                for s in sections))
        args.append(f"--secret=id=pip.conf,src={conf}")
    if ca and os.path.isfile(ca):
        args.append(f"--secret=id=pip-ca,src={ca}")
    args += [f"--volume={p}:{p}:ro" for p in mounts]
    links = [p for v in (settings.get(("global", "find-links")),) if v for p in local_paths(v)]
    torch = cpu_torch(links, python_tag)
    index = settings.get(("global", "index-url"), "https://pypi.org/simple")
    if torch:
        args += [f"--build-arg=TORCH_VERSION={torch[0]}", f"--build-arg=TORCHVISION_VERSION={torch[1]}",
                 f"--build-arg=TORCH_INDEX={index}"]
    elif not reachable(f"{CPU_INDEX}/torch/", ca):
        print(f"image_pip_settings.py: {CPU_INDEX} does not answer and no CPU torch + torchvision pair lies in "
              f"{links or 'a find-links folder'}: the image gets the CUDA torch of {index} (several GB)", file=sys.stderr)
        args.append(f"--build-arg=TORCH_INDEX={index}")
    return args


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    print("\n".join(main(Path(sys.argv[1]), sys.argv[2])))
