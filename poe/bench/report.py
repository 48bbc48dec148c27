"""How every benchmark reports: the machine it ran on, the header of its Markdown section, the
provenance fields of its JSON, and the section it writes between its markers in docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from poe.engine.errors import InvalidArgument

DOCS_INTRO = """# Benchmarks

Every figure on this page is written by the benchmark tools, never by hand: each section lies
between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers and is replaced by
`poe bench NAME ... --update-docs`, together with the exact command and the hardware it ran on.
"""


# -- the machine ---------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), None)
        if model:
            return model
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def hardware(device: str = "cpu") -> dict:
    """What the figures were measured on: CPU model, cores, torch version and threads, the git
    commit, and the GPU when `device` is a CUDA device."""
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
        if commit:
            info["commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def hardware_line(hw: dict) -> str:
    return (f"{hw['cpu']}, {hw['cores']} cores"
            + (f", GPU {hw['gpu']} (CUDA {hw.get('cuda')})" if hw.get("gpu") else "")
            + f", torch {hw['torch']} ({hw['torch_threads']} thread(s)), "
            f"Python {hw['python']}" + (f", commit {hw['commit']}" if hw.get("commit") else ""))


def device_label(device: str | None, hw: dict | None = None) -> str:
    """'the CPU', or the GPU's name and device for a CUDA device."""
    if not device or device == "cpu":
        return "the CPU"
    gpu = (hw or {}).get("gpu")
    return f"the GPU {gpu} ({device})" if gpu else f"the GPU ({device})"


# -- results and their Markdown ------------------------------------------------------------------

def stamp(result: dict, *, quick: bool, hw: dict, command: str | None, started: float) -> dict:
    """Adds what every result states: quick mode, hardware, the command, the date and the duration."""
    result.update({"quick": quick, "hardware": hw, "command": command or f"poe bench {result['part']}",
                   "date": time.strftime("%Y-%m-%d", time.localtime(started)),
                   "seconds": round(time.time() - started, 1)})
    return result


def header(result: dict, trained_on: str | None = None) -> list[str]:
    """The section's first lines: command, date, hardware, pool and, for a benchmark that trains,
    `trained_on` with `{}` standing for the device (e.g. 'baselines trained on {}')."""
    where = ("; " + trained_on.format(device_label(result["settings"].get("device", "cpu"), result["hardware"]))
             if trained_on else "")
    lines = [f"Command: `{result.get('command', '(library call)')}`  ",
             f"Measured {result.get('date', '')} on {hardware_line(result['hardware'])}; pool `{result['pool']}`"
             f"{where}."]
    if result.get("quick"):
        lines.append("")
        lines.append("**Quick mode**: tiny subsets and budgets that check the harness; these figures say nothing "
                     "about the product.")
    return lines


def percent(v: float | None) -> str:
    """An accuracy in [0, 1] as a percentage with two decimals ('–' when missing)."""
    return "–" if v is None else f"{100 * v:.2f}"


# -- docs/BENCHMARKS.md --------------------------------------------------------------------------

def markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def update_docs(path: str | Path, section: str, body: str, title: str | None = None) -> Path:
    """Replace the text between the section's markers (appending the section, under `title`, when
    it is missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else DOCS_INTRO
    start, end = markers(section)
    i, j = text.find(start), text.find(end)
    if (i < 0) != (j < 0) or (i >= 0 and j < i) or text.count(start) > 1 or text.count(end) > 1:
        raise InvalidArgument(f"{path}: malformed markers for section {section!r} (need one {start} before one {end})")
    if i >= 0:
        text = text[:i + len(start)] + "\n" + body.strip() + "\n" + text[j:]
    else:
        text = text.rstrip("\n") + f"\n\n## {title or section}\n\n{start}\n{body.strip()}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
