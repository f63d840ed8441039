"""Reuse across turns: a multi-turn chat about one image, cold against warm, through a real
``xinference-local``.

The conversation: one photo-like image (smooth gradients, shapes and sensor noise, a JPEG data
URL; 1920x1080 on real shapes), sent in the first user message only; every later turn sends the
whole history as a chat client does (the image again in the first message, each earlier question
and the assistant's answers as the client received them, then the new question). Greedy,
``ignore_eos``, a few new tokens per turn, so the answers are deterministic.

* cold: a model launched with ``--reuse_cache_mib 0``: every turn prefills the whole conversation,
  the vision tower included;
* warm: the same checkpoint launched with reuse on (``--reuse_cache_mib`` given explicitly), the
  turns sent in order: turn N starts from turn N-1's stored KV cache and prefills only what is new.

Both models are launched in one server under their own uids when memory allows (the turns then
alternate, cold then warm, so that load from other jobs falls on both alike), else one after the
other, each in a server of its own. Each model first answers one untimed warm-up request with
another image, so neither turn 1 pays the first call's one-time costs.

Timed per turn: TTFT, from sending the request to the first streamed chunk with text (the
``openai`` client); also the whole turn. The exactness check: each warm answer must equal the
cold answer of the same turn (and, since histories then agree, the prompts have equal token
counts). Target: warm TTFT of turns 2 and later at most 0.25x the cold one.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ovis2_xinf.local_server import local_server

TARGET_RATIO = 0.25
QUESTIONS = (
    "Describe this photo in one sentence.",
    "What colours stand out the most?",
    "Is there anything unusual in the picture?",
    "Suggest a short title for it.",
)
REUSE_MIB = 2048  # the CPU default, given explicitly


def photo(size=(1920, 1080), seed: int = 0) -> Image.Image:
    """A photo-like RGB image: sky and ground gradients, blurred shapes, fine noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    sky = np.array([90, 140, 220]) * (1 - y) + np.array([220, 200, 170]) * y
    ground = np.array([70, 110, 40]) * (1 - y) + np.array([40, 60, 20]) * y
    horizon = 0.55 + 0.05 * np.sin(x * 7 + seed)
    pixels = np.where(y < horizon, sky, ground) + 15 * np.sin(x * 23 + y * 11)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    shapes = Image.new("RGB", size)
    draw = ImageDraw.Draw(shapes)
    for _ in range(12):
        cx, cy = rng.uniform(0, width), rng.uniform(0.3 * height, height)
        r = rng.uniform(0.02, 0.12) * width
        draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=tuple(int(v) for v in rng.integers(30, 230, 3)))
    mask = Image.fromarray((np.asarray(shapes).sum(-1) > 0).astype(np.uint8) * 200)
    image.paste(shapes.filter(ImageFilter.GaussianBlur(3)), mask=mask.filter(ImageFilter.GaussianBlur(6)))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def history(url: str, questions: List[str], answers: List[str]) -> List[Dict[str, Any]]:
    """The messages of the next turn: the image in the first user message, earlier answers as received."""
    messages: List[Dict[str, Any]] = []
    for turn, question in enumerate(questions):
        if turn == 0:
            messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": question}]})
        else:
            messages.append({"role": "user", "content": question})
        if turn < len(answers):
            messages.append({"role": "assistant", "content": answers[turn]})
    return messages


def _stream(client, uid: str, messages, max_tokens: int) -> Dict[str, Any]:
    start = time.perf_counter()
    first = None
    text, usage = "", None
    stream = client.chat.completions.create(
        model=uid, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    end = time.perf_counter()
    return {"ttft_s": None if first is None else first - start, "turn_s": end - start, "text": text,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None}


class Chat:
    """One model's side of the conversation: its own history, one turn at a time."""

    def __init__(self, client, uid: str, url: str, max_tokens: int):
        self.client, self.uid, self.url, self.max_tokens = client, uid, url, max_tokens
        self.answers: List[str] = []
        self.turns: List[Dict[str, Any]] = []

    def warm_up(self, url: str) -> None:
        _stream(self.client, self.uid, history(url, ["Warm-up: what is this?"], []), 2)

    def turn(self) -> Dict[str, Any]:
        index = len(self.turns)
        result = _stream(self.client, self.uid, history(self.url, list(QUESTIONS[:index + 1]), self.answers),
                         self.max_tokens)
        self.answers.append(result["text"])
        self.turns.append(result)
        return result


def _launch(server, path: Path, uid: str, reuse_mib: int) -> float:
    start = time.perf_counter()
    server.launch("--model-engine", "transformers", "--model-name", "Ovis2", "--size-in-billions", "1",
                  "--model-format", "pytorch", "--model-path", str(path), "--torch_dtype", "float32",
                  "--model-uid", uid, "--reuse_cache_mib", str(reuse_mib))
    return time.perf_counter() - start


def _available_bytes() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _float32_bytes(path: Path) -> int:
    """What the loaded model takes in float32: the checkpoint's weights at 4 bytes each."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    stored = {"float32": 4, "float16": 2, "bfloat16": 2}.get(config.get("torch_dtype"), 2)
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) * 4 // stored


def run(path: Path, smoke: bool) -> Dict[str, Any]:
    from openai import OpenAI

    turns = 2 if smoke else 4
    size = (320, 240) if smoke else (1920, 1080)
    max_tokens = 8 if smoke else 16
    url = data_url(photo(size, seed=0))
    warm_up_url = data_url(photo((640, 480), seed=1))
    # Both in one server when, after the first is loaded, a second copy still leaves a margin.
    per_model = _float32_bytes(path) + (1536 << 20)
    result: Dict[str, Any] = {"image": f"{size[0]}x{size[1]} JPEG", "turns": turns, "max_tokens": max_tokens,
                              "reuse_cache_mib": REUSE_MIB, "target_ratio": TARGET_RATIO, "launch_s": {}}

    def connect(server):
        return OpenAI(base_url=f"{server.endpoint}/v1", api_key="none", max_retries=0, timeout=3600)

    chats: Dict[str, Chat] = {}
    with local_server() as server:
        client = connect(server)
        result["launch_s"]["warm"] = _launch(server, path, "ovis2-warm", REUSE_MIB)
        available = _available_bytes()
        together = available is not None and available > per_model + (4 << 30)
        result["mode"] = "one server, turns alternating" if together else "one model after the other"
        print(f"  {result['mode']} (available {0 if available is None else available / 2**30:.1f} GiB, "
              f"one model about {per_model / 2**30:.1f} GiB)", flush=True)
        if together:
            result["launch_s"]["cold"] = _launch(server, path, "ovis2-cold", 0)
            chats = {"cold": Chat(client, "ovis2-cold", url, max_tokens),
                     "warm": Chat(client, "ovis2-warm", url, max_tokens)}
            for chat in chats.values():
                chat.warm_up(warm_up_url)
            for index in range(turns):
                for name, chat in chats.items():
                    print(f"  turn {index + 1}: {name}", flush=True)
                    chat.turn()
        else:
            chats["warm"] = Chat(client, "ovis2-warm", url, max_tokens)
            chats["warm"].warm_up(warm_up_url)
            for index in range(turns):
                print(f"  turn {index + 1}: warm", flush=True)
                chats["warm"].turn()
    if "cold" not in chats:
        with local_server() as server:
            client = connect(server)
            result["launch_s"]["cold"] = _launch(server, path, "ovis2-cold", 0)
            chats["cold"] = Chat(client, "ovis2-cold", url, max_tokens)
            chats["cold"].warm_up(warm_up_url)
            for index in range(turns):
                print(f"  turn {index + 1}: cold", flush=True)
                chats["cold"].turn()
    rows = []
    for index in range(turns):
        cold, warm = chats["cold"].turns[index], chats["warm"].turns[index]
        ratio = warm["ttft_s"] / cold["ttft_s"] if cold["ttft_s"] and warm["ttft_s"] is not None else None
        rows.append({"turn": index + 1, "prompt_tokens": warm["prompt_tokens"], "cold_ttft_s": cold["ttft_s"],
                     "warm_ttft_s": warm["ttft_s"], "warm_over_cold": ratio,
                     "cold_turn_s": cold["turn_s"], "warm_turn_s": warm["turn_s"],
                     "answers_equal": cold["text"] == warm["text"],
                     "prompt_tokens_equal": cold["prompt_tokens"] == warm["prompt_tokens"],
                     "cold_answer": cold["text"], "warm_answer": warm["text"]})
    result["rows"] = rows
    later = [r["warm_over_cold"] for r in rows[1:]]
    result["verdict"] = {
        "later_turns_max_ratio": max(later) if later and None not in later else None,
        "target_met": bool(later) and None not in later and max(later) <= TARGET_RATIO,
        "answers_equal": all(r["answers_equal"] for r in rows),
        "every_turn_had_text": all(r["cold_ttft_s"] is not None and r["warm_ttft_s"] is not None for r in rows),
    }
    return result
