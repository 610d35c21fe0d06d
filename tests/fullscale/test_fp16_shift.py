"""The fp16 path: the semantic-shift tracker on fp16 text-encoder outputs matches fp32 on the same inputs.

SD 1.5's text encoder at its real size (CLIP ViT-L/14 text tower, 123 M parameters, random weights from the
shipped config) runs once in float32 and once as its float16 copy; every tracked metric agrees to well under 1 %.
CPU float16 is supported by torch for this model; a CUDA device is used in addition when there is one."""
import copy

import pytest
import torch

from persviz.sd15 import load_sd15_tokenizer, sd15_config_dir
from persviz.tea.tracker import track_semantic_shift

PROMPTS = ["a photo of a {}", "a {} on the beach", "a painting of a {} in the style of van gogh", "a {} wearing a hat",
           "a close-up photo of a {} at night", "a {} in a forest", "a watercolor of a {}", "a {} next to a red car"]
RTOL = 1e-2
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def text_encoder_and_run():
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(sd15_config_dir() / "text_encoder")).eval()
        tok = load_sd15_tokenizer()
        c = encoder.get_input_embeddings().weight[tok.convert_tokens_to_ids("dog</w>")].detach()
        run = {0: c + 0.01 * torch.randn(c.shape), 100: c + 0.05 * torch.randn(c.shape)}  # V* drifting from c
    return tok, encoder, run


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_tracker_metrics_fp16_match_fp32(text_encoder_and_run, device):
    tok, encoder, run = text_encoder_and_run
    fp32 = track_semantic_shift((tok, encoder.to(device)), run, PROMPTS, class_word="dog", progress=False)
    half = copy.deepcopy(encoder).to(device, torch.float16)
    fp16 = track_semantic_shift((tok, half), run, PROMPTS, class_word="dog", progress=False)
    encoder.to("cpu")
    assert fp16["step"] == fp32["step"] == [0, 100]
    worst = {}
    for key, values in fp32.items():
        if key == "step":
            continue
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(values, fp16[key])]
        worst[key] = max(rel)
    print(f"\nfp16 vs fp32 on {device}: max relative difference per metric:",
          ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items(), key=lambda kv: -kv[1])))
    assert max(worst.values()) < RTOL, worst
    assert max(v for k, v in worst.items() if "kl" not in k) < 1e-3, worst  # KL: small values, a bit noisier
