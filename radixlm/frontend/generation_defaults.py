"""The model's own sampling defaults (generation_config.json) for requests that leave them unset.

Model authors tune these (Qwen2.5-Instruct ships temperature 0.7, top_p 0.8, top_k 20, repetition_penalty
1.05), and vLLM applies them by default, so the same request samples the same way on both servers. Only
what the caller did not set is taken from the file: a dict's missing keys, the OpenAI routes' omitted
fields. A SamplingParams object is complete by construction and used as it is.

`do_sample: false` in the file is not honoured (vLLM does not either): greedy is asked for with
temperature 0.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from radixlm.sampling_params import SamplingParams

logger = logging.getLogger("radixlm")

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_sampling_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The sampling keys generation_config.json sets, checked as SamplingParams would check them (a bad
    file fails at start, naming the key and the file)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        return {}
    defaults = {k: data[k] for k in SAMPLING_KEYS if data.get(k) is not None}
    try:
        SamplingParams.from_any(defaults)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if defaults:
        logger.info("sampling defaults from %s (for requests that leave them unset): %s", path.name, defaults)
    return defaults


def with_defaults(sampling_params: Any, defaults: Mapping[str, Any]) -> Any:
    """`sampling_params` as a generate call takes it (None, a dict, a SamplingParams, or a list of those),
    with `defaults` filling the keys each dict leaves out."""
    if not defaults:
        return sampling_params
    if sampling_params is None:
        return dict(defaults)
    if isinstance(sampling_params, Mapping):
        return {**defaults, **sampling_params}
    if isinstance(sampling_params, list):
        return [with_defaults(p, defaults) for p in sampling_params]
    return sampling_params
