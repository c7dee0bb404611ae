"""RuntimeEndpoint: programs run against a server's `/generate` (`radixlm serve`, or an SGLang server).

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))

The request fields are the Engine's own (`text` or `input_ids`, `sampling_params`, `return_logprob`,
`logprob_start_len`), and so are the answers, so EngineBackend and this backend give the same results.
Role blocks need the model's chat template on this side: it is read from the tokenizer folder the server
reports (/get_model_info), or named with `chat_template_name` (a built-in template: chatml, llama-3, ...).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from radixlm.lang.backend import Backend, BackendError, Prompts
from radixlm.lang.chat import RoleTemplate, template_from_jinja, template_from_tokenizer

# Threads of run_batch share one client; each running program holds at most one request at a time.
MAX_CONNECTIONS = 256


class RuntimeEndpoint(Backend):
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        chat_template_name: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=30.0),
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        )
        self.model_info = self._get("/get_model_info")
        self._template_name = chat_template_name
        self._template: RoleTemplate | None = None
        self._template_loaded = False
        self._template_lock = threading.Lock()

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _json(self._http.post(path, json=body))

    def _get(self, path: str) -> Any:
        return _json(self._http.get(path))

    # ---- the backend calls ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompts,
        params: list[dict[str, Any]],
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
    ) -> list[dict[str, Any]]:
        body = _body(prompts, params, return_logprob, logprob_start_len, top_logprobs_num)
        out = self._post("/generate", body)
        return out if isinstance(out, list) else [out]

    def stream(self, prompt: str, params: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        body = {"text": prompt, "sampling_params": params, "stream": True}
        shown = 0
        with self._http.stream("POST", "/generate", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                _json(resp)
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise BackendError(_message(event))
                # Each event carries the whole text so far: the delta is what this side has not shown.
                text = event["text"]
                yield text[shown:], event["meta_info"]
                shown = len(text)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self._post("/tokenize", {"prompt": list(texts)})["tokens"]

    def role_template(self) -> RoleTemplate | None:
        with self._template_lock:
            if not self._template_loaded:
                self._template = self._load_template()
                self._template_loaded = True
            return self._template

    def get_server_info(self) -> dict[str, Any]:
        return self._get("/get_server_info")

    def flush_cache(self) -> bool:
        return self._http.post("/flush_cache").status_code == 200

    def shutdown(self) -> None:
        self._http.close()

    def _load_template(self) -> RoleTemplate | None:
        tokenizer = _tokenizer(self.model_info.get("tokenizer_path") or self.model_info.get("model_path"))
        if self._template_name is not None:
            from radixlm.frontend.chat_templates import builtin_chat_template, builtin_names

            jinja = builtin_chat_template(self._template_name)
            if jinja is None:
                raise ValueError(
                    f"unknown chat_template_name {self._template_name!r}; built-in: {', '.join(builtin_names())}"
                )
            if tokenizer is None:
                return template_from_jinja(jinja)
            return template_from_tokenizer(tokenizer, jinja)
        return None if tokenizer is None else template_from_tokenizer(tokenizer)


def _tokenizer(path: str | None) -> Any:
    """The server's tokenizer, read on this side (None when this machine cannot read it)."""
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _body(
    prompts: Prompts, params: list[dict[str, Any]], return_logprob: bool, start: int, top: int
) -> dict[str, Any]:
    key = "input_ids" if prompts and not isinstance(prompts[0], str) else "text"
    body: dict[str, Any] = {key: list(prompts), "sampling_params": list(params)}
    if return_logprob:
        body.update(return_logprob=True, logprob_start_len=start, top_logprobs_num=top)
    return body


def _json(resp: httpx.Response) -> Any:
    if resp.status_code != 200:
        try:
            raise BackendError(_message(resp.json()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BackendError(f"HTTP {resp.status_code}: {resp.text[:500]}") from None
    return resp.json()


def _message(body: Any) -> str:
    """The error text of an OpenAI-style body ({"error": {"message"}}) or SGLang's, else the body."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return str(body)
