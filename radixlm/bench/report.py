"""Results of one benchmark run: one row per system, printed as a table with ratios against radixlm.

Every number here is measured in the run that prints it. "output tokens" counts only the tokens each
request asked for (a static batch that decodes past a short request's length does not get credit for
the extra tokens); a system that produced fewer tokens than requested is flagged, not hidden.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REFERENCE = "radixlm"


@dataclass
class SystemResult:
    system: str
    requests: int
    prompt_tokens: int
    requested_tokens: int  # sum of every request's max_new_tokens
    output_tokens: int  # useful tokens: sum over requests of min(generated, requested)
    generated_tokens: int  # every token decoded, including a static batch's overrun past short requests
    seconds: float
    short_requests: int = 0  # requests that got fewer tokens than they asked for
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.short_requests == 0 and self.output_tokens == self.requested_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output_tok_per_s": self.tok_per_s, "complete": self.complete}


def count_tokens(generated: list[int], requested: list[int]) -> tuple[int, int, int]:
    """(useful, generated, short) from per-request generated and requested counts."""
    useful = sum(min(g, r) for g, r in zip(generated, requested, strict=True))
    short = sum(1 for g, r in zip(generated, requested, strict=True) if g < r)
    return useful, sum(generated), short


@dataclass
class BenchReport:
    benchmark: str
    workload: dict[str, Any]
    results: list[SystemResult] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    headlines: list[str] = field(default_factory=list)  # one-line conclusions printed under the table

    def add(self, result: SystemResult) -> SystemResult:
        self.results.append(result)
        return result

    def reference(self) -> SystemResult | None:
        return next((r for r in self.results if r.system == REFERENCE), None)

    def ratio(self, result: SystemResult) -> float | None:
        """radixlm's output tok/s divided by this system's: above 1 means radixlm is faster."""
        ref = self.reference()
        if ref is None or result.tok_per_s <= 0:
            return None
        return ref.tok_per_s / result.tok_per_s

    def table(self) -> str:
        extra_cols = [c for c in ("cache_hit_rate",) if any(c in r.extra for r in self.results)]
        header = ["system", "requests", "out tokens", "seconds", "out tok/s", "radixlm x"]
        header += [c.replace("_", " ") for c in extra_cols]
        rows = []
        for r in self.results:
            ratio = self.ratio(r)
            row = [
                r.system,
                str(r.requests),
                f"{r.output_tokens:,}" + ("" if r.complete else " (!)"),
                f"{r.seconds:.2f}",
                f"{r.tok_per_s:.1f}",
                "-" if ratio is None else f"{ratio:.2f}",
            ]
            row += [_fmt_pct(r.extra.get(c)) for c in extra_cols]
            rows.append(row)
        lines = [f"== radixlm bench {self.benchmark} =="]
        lines.append("workload: " + ", ".join(f"{k}={v}" for k, v in self.workload.items()))
        lines += _format_rows(header, rows)
        lines.append(
            "out tokens: only the tokens each request asked for; radixlm x: radixlm out tok/s / this system's"
        )
        for r in self.results:
            for note in r.notes:
                lines.append(f"  [{r.system}] {note}")
            if not r.complete:
                lines.append(
                    f"  [{r.system}] (!) {r.short_requests} request(s) got fewer tokens than requested: "
                    f"{r.output_tokens:,} of {r.requested_tokens:,}"
                )
        lines += self.headlines
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "workload": self.workload,
            "environment": self.environment,
            "headlines": self.headlines,
            "results": [{**r.to_dict(), "radixlm_ratio": self.ratio(r)} for r in self.results],
        }


def environment(model_path: str, dtype: str) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "command": " ".join(["radixlm bench", *sys.argv[2:]])
        if sys.argv[1:2] == ["bench"]
        else " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_path": model_path,
        "dtype": dtype,
        "radixlm": _radixlm_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _radixlm_version() -> str:
    """The package version, plus the git commit (and '-dirty') when running from a checkout, so that a
    result can be traced to the code that produced it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("radixlm")
    except PackageNotFoundError:
        v = "unknown"
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return v
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return v
    return f"{v} (git {commit})"


def write_json(path: str, reports: list[Any]) -> None:
    data = [r.to_dict() for r in reports]
    with open(path, "w") as f:
        json.dump(data[0] if len(data) == 1 else data, f, indent=2)
        f.write("\n")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _format_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def fmt(cells: list[str]) -> str:
        # first column left-aligned (names), numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in rows]]
