"""persviz.finexl.concepts: concept banks, ranking, and VLM proposers against a local chat-completions server.

The server is a real http.server on 127.0.0.1 (in a thread) speaking the OpenAI chat-completions protocol;
each test sets what it answers: a good list, garbage, a late answer (timeout), HTTP 500.
"""
import base64
import io
import json
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from persviz.finexl.decompose import decompose, divergence_vector, greedy_decompose, orthogonal_filter
from persviz.finexl.concepts import (ART_BANK, SHAPESWORLD_BANK, SHAPESWORLD_WORD_BANK, STYLE_ASPECTS, BankProposer,
                                     ConceptProposalError, ConceptProposer, OpenAIChatProposer,
                                     TransformersVLMProposer, bank_candidates, concept_directions, default_bank,
                                     known_levels, parse_concept_list, png_data_url, rank_concepts)
from persviz.finexl.generators import RendererGenerator, paired_samples, shapesworld_probes
from persviz.loading import ModelNotAvailableError
from persviz.shapesworld.captions import world_words
from persviz.shapesworld.render import Style

torch.set_num_threads(1)
D = 16


# ----------------------------------------------------------------------------- a chat-completions server


class ChatServer:
    """A tiny OpenAI-compatible server: `answers` is a list of (status, body or callable) served in turn."""

    def __init__(self):
        self.requests: list[dict] = []
        self.answers: list = []
        self.delay = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, payload = outer.answers[min(len(outer.requests), len(outer.answers)) - 1]
                if outer.delay:
                    time.sleep(outer.delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def reply(self, *contents, status=200):
        """Answer the i-th request with an assistant message holding contents[i] (the last one repeats)."""
        self.answers = [(status, {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}]})
            for c in contents]


@pytest.fixture(scope="module")
def server():
    s = ChatServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def chat(server):
    server.requests.clear()
    server.delay = 0.0
    server.answers = []
    return server


@pytest.fixture(scope="module")
def pairs():
    prompts, _ = shapesworld_probes(3, seed=0)
    return paired_samples(RendererGenerator(Style()), RendererGenerator(Style(warmth=0.7)), prompts, seeds=[0])


def _png(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


# ----------------------------------------------------------------------------- OpenAI chat proposer


def test_good_answer_and_the_request_format(chat, pairs):
    chat.reply('```json\n["Warmer colors", "thick outlines."]\n```')
    prop = OpenAIChatProposer(chat.url, "gpt-4o", api_key="test-key", timeout=5, max_pairs=2, min_side=64)
    assert isinstance(prop, ConceptProposer)
    assert prop(*pairs) == ["warmer colors", "thick outlines"]
    assert len(chat.requests) == 2  # one request per pair, max_pairs of them
    req = chat.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer test-key"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "gpt-4o" and body["temperature"] == 0.0
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    text, first, second = msg["content"]
    assert text["type"] == "text" and "JSON list" in text["text"] and "up to 10" in text["text"]
    assert first["type"] == second["type"] == "image_url"
    a, b = _png(first["image_url"]["url"]), _png(second["image_url"]["url"])
    assert a.shape == (64, 64, 3)  # 32x32 enlarged by 2 (nearest) to min_side
    np.testing.assert_array_equal(a[::2, ::2], pairs[0][0])  # base image first
    np.testing.assert_array_equal(b[::2, ::2], pairs[1][0])


def test_union_over_pairs_in_order_and_no_key(chat, pairs, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    chat.reply('["warmer colors", "blurry"]', 'Sure! ["Blurry", "darker background"]', "- noisy\n- warmer colors")
    prop = OpenAIChatProposer(chat.url + "/chat/completions", "local-vlm", timeout=5, max_pairs=5)
    assert prop(*pairs) == ["warmer colors", "blurry", "darker background", "noisy"]
    assert len(chat.requests) == 3  # only 3 pairs exist
    assert "Authorization" not in chat.requests[0]["headers"]
    assert chat.requests[0]["path"] == "/v1/chat/completions"
    assert OpenAIChatProposer(chat.url, "m", max_concepts=2, timeout=5)(*pairs) == ["noisy", "warmer colors"]


def test_garbage_answer_raises_or_falls_back(chat, pairs):
    chat.reply("I am sorry, I cannot compare images.")
    with pytest.raises(ConceptProposalError, match="garbage answer.*cannot compare.*fallback=default_bank"):
        OpenAIChatProposer(chat.url, "m", timeout=5, max_pairs=2)(*pairs)
    assert len(chat.requests) == 2  # a garbage answer skips the pair, the next one is still asked
    chat.answers = [(200, b"<html>not json</html>")]
    with pytest.raises(ConceptProposalError, match="did not answer with JSON"):
        OpenAIChatProposer(chat.url, "m", timeout=5, max_pairs=1)(*pairs)
    chat.answers = [(200, {"object": "list", "data": []})]
    with pytest.raises(ConceptProposalError, match="no choices\\[0\\].message.content"):
        OpenAIChatProposer(chat.url, "m", timeout=5, max_pairs=1)(*pairs)


def test_one_garbage_pair_is_skipped_with_a_warning(chat, pairs):
    chat.reply("no idea", '["faded colors"]')
    prop = OpenAIChatProposer(chat.url, "m", timeout=5, max_pairs=2)
    with pytest.warns(UserWarning, match="1 pair\\(s\\) failed"):
        assert prop(*pairs) == ["faded colors"]
    assert prop.answers == ["no idea", '["faded colors"]'] and len(prop.errors) == 1


def test_timeout(chat, pairs):
    chat.reply('["warmer colors"]')
    chat.delay = 1.0
    prop = OpenAIChatProposer(chat.url, "m", timeout=0.25, max_pairs=3)
    t0 = time.monotonic()
    with pytest.raises(ConceptProposalError, match="no answer from .* within timeout=0.25 s"):
        prop(*pairs)
    assert time.monotonic() - t0 < 0.9  # it did not wait for the late answer
    assert len(chat.requests) == 1  # a transport failure stops at once: no more requests


def test_http_500(chat, pairs):
    chat.answers = [(500, {"error": {"message": "model overloaded"}})]
    with pytest.raises(ConceptProposalError, match="HTTP 500.*model overloaded"):
        OpenAIChatProposer(chat.url, "m", timeout=5)(*pairs)
    chat.answers = [(200, {"error": {"message": "bad model name"}})]
    with pytest.raises(ConceptProposalError, match="answered with an error.*bad model name"):
        OpenAIChatProposer(chat.url, "m", timeout=5)(*pairs)


@pytest.mark.parametrize("failure", ["garbage", "timeout", "http500", "unreachable"])
def test_fallback_to_the_bank(chat, pairs, failure):
    url = chat.url
    if failure == "garbage":
        chat.reply("The second image looks nicer.")
    elif failure == "timeout":
        chat.reply('["warmer colors"]')
        chat.delay = 0.6
    elif failure == "http500":
        chat.answers = [(500, b"internal error")]
    else:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    prop = OpenAIChatProposer(url, "m", timeout=0.2, max_pairs=2, fallback=SHAPESWORLD_BANK)
    with pytest.warns(UserWarning, match="got no concept phrases.*Falling back"):
        assert prop(*pairs) == list(SHAPESWORLD_BANK)
    assert prop.errors
    if failure == "unreachable":
        assert "could not reach" in prop.errors[0]


def test_proposer_bad_arguments(pairs):
    with pytest.raises(ValueError, match="http\\(s\\) URL"):
        OpenAIChatProposer("localhost:8000", "m")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        OpenAIChatProposer("http://127.0.0.1:1/v1", "m", timeout=0)
    with pytest.raises(ValueError, match="model must name"):
        OpenAIChatProposer("http://127.0.0.1:1/v1", " ")
    with pytest.raises(ValueError, match="fallback is empty"):
        OpenAIChatProposer("http://127.0.0.1:1/v1", "m", fallback=[])
    prop = OpenAIChatProposer("http://127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="differ in shape"):
        prop(pairs[0], pairs[1][:2])


# ----------------------------------------------------------------------------- answer parsing


@pytest.mark.parametrize("answer, expected", [
    ('["warmer colors", "blurry"]', ["warmer colors", "blurry"]),
    ('Here you go:\n```json\n["Warmer colors", "Blurry."]\n```\nHope it helps', ["warmer colors", "blurry"]),
    ('The differences are ["darker background", "noisy"] overall.', ["darker background", "noisy"]),
    ('{"aspects": ["thick outlines", "faded colors"]}', ["thick outlines", "faded colors"]),
    ('[{"aspect": "finer patterns", "level": 0.4}, {"name": "larger objects"}]', ["finer patterns", "larger objects"]),
    ("['cooler colors', 'sharp edges']", ["cooler colors", "sharp edges"]),
    ("1. Warmer colors\n2. Thicker outlines\n3) blurry", ["warmer colors", "thicker outlines", "blurry"]),
    ('["More saturated colors", "much more blur", "more"]', ["saturated colors", "blur", "more"]),
    ('["blurry", "blurry", "  Blurry ", "", 3, "a very long sentence that is clearly not a short aspect"]', ["blurry"]),
])
def test_parse_concept_list_reads_common_answer_shapes(answer, expected):
    assert parse_concept_list(answer) == expected


@pytest.mark.parametrize("answer", ["", "   ", "The images look the same to me.", "[]", '{"a": 1}', "[1, 2, 3]",
                                    "```json\n{}\n```"])
def test_parse_concept_list_rejects_garbage(answer):
    with pytest.raises(ConceptProposalError, match="empty|garbage answer"):
        parse_concept_list(answer)


def test_png_data_url_round_trips():
    img = (np.arange(4 * 6 * 3) % 256).astype(np.uint8).reshape(4, 6, 3)
    np.testing.assert_array_equal(_png(png_data_url(img)), img)
    assert _png(png_data_url(img, min_side=9)).shape == (12, 18, 3)  # factor 3: shorter side 4 -> 12


# ----------------------------------------------------------------------------- local transformers VLM


def test_transformers_vlm_offline_raises_model_not_available(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="Qwen/Qwen2-VL-2B-Instruct.*BankProposer"):
        TransformersVLMProposer("Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(ModelNotAvailableError, match="folder '/nonexistent/vlm' does not exist"):
        TransformersVLMProposer("/nonexistent/vlm")


def test_transformers_vlm_with_a_loaded_pipeline_object(pairs):
    """Any callable with the image-text-to-text pipeline's call and output shape is accepted as loaded."""
    calls = []

    def fake_pipeline(text, max_new_tokens, return_full_text):
        calls.append(text)
        return [{"generated_text": '["warmer colors", "more saturated colors"]'}]

    prop = TransformersVLMProposer(fake_pipeline, max_pairs=2, min_side=64)
    assert prop(*pairs) == ["warmer colors", "saturated colors"]
    content = calls[0][0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"] and content[0]["image"].size == (64, 64)

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory")

    with pytest.warns(UserWarning, match="CUDA out of memory.*Falling back"):
        assert TransformersVLMProposer(broken, fallback=["blurry"])(*pairs) == ["blurry"]
    with pytest.raises(TypeError, match="Hub id, a local folder or a loaded"):
        TransformersVLMProposer(42)


# ----------------------------------------------------------------------------- banks and ranking


def test_banks_and_known_levels(monkeypatch):
    assert 35 <= len(ART_BANK) <= 45 and len(set(ART_BANK)) == len(ART_BANK)
    assert len(set(SHAPESWORLD_BANK)) == len(SHAPESWORLD_BANK)
    for _, up, down in STYLE_ASPECTS.values():  # every style knob can be named by the ShapesWorld bank
        assert up in SHAPESWORLD_BANK and down in SHAPESWORLD_BANK
    words = set(world_words())  # the word bank speaks only the embedded CLIP's vocabulary
    assert all(w in words for p in SHAPESWORLD_WORD_BANK for w in p.split())
    monkeypatch.setenv("PERSVIZ_SCALE", "full")  # the library never reads it: the caller passes the scale
    assert default_bank() == SHAPESWORLD_BANK and BankProposer()() == list(SHAPESWORLD_BANK)
    assert default_bank("full") == ART_BANK and BankProposer(default_bank("full"))() == list(ART_BANK)
    assert known_levels(Style(), Style(warmth=0.6, blur=1.0)) == {"warm colors": 0.6, "blurry": 1.0}
    assert known_levels(Style(size_scale=1.5), Style(size_scale=1.0)) == {"small objects": 0.5}
    assert known_levels(Style(), Style()) == {}


def _encoder(shifts: dict[str, np.ndarray]):
    """Text encoder whose concept suffix adds a known vector: E(t + ', ' + C) = E(t) + shifts[C]."""
    rng = np.random.default_rng(0)
    base = {}

    def encode(texts):
        rows = []
        for s in texts:
            t, _, c = s.partition(", ")
            if t not in base:
                base[t] = rng.normal(size=D)
            rows.append(base[t] + (shifts[c] if c else 0.0))
        return torch.tensor(np.stack(rows))
    return encode


def _e(i):
    v = np.zeros(D)
    v[i] = 1.0
    return v


def test_rank_concepts_orders_by_absolute_cosine_with_sign():
    shifts = {"warmer colors": 0.3 * _e(0), "blurry": 0.3 * _e(1), "noisy": 0.3 * _e(2)}
    f = concept_directions(_encoder(shifts), ["a red circle", "a blue square"], list(shifts) + ["blurry", " "])
    assert list(f) == ["warmer colors", "blurry", "noisy"]  # duplicates and blanks dropped
    v = torch.from_numpy(-0.8 * f["blurry"].numpy() / f["blurry"].norm().item() + 0.3 * f["warmer colors"].numpy())
    ranked = rank_concepts(v, f)
    assert [n for n, _ in ranked][:2] == ["blurry", "warmer colors"]
    assert ranked[0][1] < -0.5 < 0 < ranked[1][1]
    top = bank_candidates(v, _encoder(shifts), ["a red circle"], bank=list(shifts), top_k=1)
    assert list(top) == ["blurry"]


# ----------------------------------------------------------------------------- FineXL's bad inputs


def test_empty_concept_lists_are_clear_errors():
    enc = _encoder({})
    with pytest.raises(ValueError, match="concept phrases is empty.*default_bank"):
        concept_directions(enc, ["a red circle"], [])
    with pytest.raises(ValueError, match="concept phrases is empty"):
        concept_directions(enc, ["a red circle"], ["", "  "])
    with pytest.raises(ValueError, match="single string"):
        concept_directions(enc, ["a red circle"], "blurry")
    with pytest.raises(ValueError, match="the concept bank is empty"):
        BankProposer([])
    with pytest.raises(ValueError, match="directions is empty"):
        rank_concepts(torch.ones(D), {})
    with pytest.raises(ValueError, match="concepts is empty"):
        decompose(torch.ones(D), {})


def test_all_candidates_rejected_by_the_filter():
    f = {"a": torch.from_numpy(_e(1)), "b": torch.from_numpy(_e(2)), "zero": torch.zeros(D, dtype=torch.float64)}
    v = torch.from_numpy(_e(0) + 0.01 * _e(1))  # no candidate points along v_div
    assert orthogonal_filter(v, f) == ["a", "b"]  # default: the paper's filter keeps them (relevance ignored)
    with pytest.raises(ValueError, match="no candidate concept survived: all 2 usable candidates.*"
                                         "min_relevance = 0.1 \\(largest 0.010, 'a'\\).*Propose other concepts"):
        orthogonal_filter(v, f, min_relevance=0.1)
    assert orthogonal_filter(v, f, min_relevance=0.005) == ["a"]
    with pytest.raises(ValueError, match="all of \\['zero'\\] have zero-norm"):
        orthogonal_filter(v, {"zero": f["zero"]})
    with pytest.raises(ValueError, match="min_relevance must be in \\[0, 1\\]"):
        orthogonal_filter(v, f, min_relevance=2.0)


def test_zero_divergence_from_identical_generators_is_a_clear_error():
    """End to end on the renderer: same style on both sides -> warning at sampling, error at V_div."""
    prompts, _ = shapesworld_probes(4, seed=0)
    with pytest.warns(UserWarning, match="identical images"):
        b, p = paired_samples(RendererGenerator(Style()), RendererGenerator(Style()), prompts)
    emb = lambda x: torch.from_numpy(x.reshape(len(x), -1).astype(np.float64))  # noqa: E731 (pixels as embedding)
    with pytest.raises(ValueError, match="zero norm.*look identical to the encoder"):
        divergence_vector(emb(p), emb(b))
    f = {"warmer colors": torch.ones(3 * 32 * 32, dtype=torch.float64)}
    for fn in (lambda: rank_concepts(torch.zeros(3 * 32 * 32), f), lambda: greedy_decompose(torch.zeros(8), {})):
        with pytest.raises(ValueError, match="zero norm"):
            fn()
    # and a real personalization gives a usable V_div on the same path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b, p = paired_samples(RendererGenerator(Style()), RendererGenerator(Style(warmth=0.5)), prompts)
    v, _ = divergence_vector(emb(p), emb(b))
    assert v.norm() > 1e-3
