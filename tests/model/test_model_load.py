"""Loading: the tiny model and its tokenizer, local folders, and a hub id that cannot be reached."""

from __future__ import annotations

import pytest
import torch

from clipseg_bench.errors import InputError
from clipseg_bench.model import forward as fw
from clipseg_bench.model.families.clipseg import CLIPSeg, build_tiny, reference_config, tiny_config
from clipseg_bench.model.load import load_model, save_model
from clipseg_bench.model.tokenizer import EOS, tiny_words
from clipseg_bench.organs import ORGANS, prompts


def test_tiny_is_the_same_model_in_every_call_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = load_model("tiny"), load_model("tiny")
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert a.image_size == 128 and a.mean == (0.485, 0.456, 0.406) and a.std == (0.229, 0.224, 0.225)
    assert not a.model.training


def test_tiny_decoder_init_is_sane(inputs):
    # HF's N(0, 1) decoder init gives logits with a std around 47; PyTorch's default stays small.
    model = build_tiny(tiny_config(image_size=64))
    with torch.no_grad():
        logits = fw.forward(
            model,
            inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )
    assert logits.std() < 5


def test_tiny_tokenizer_gives_known_words_one_token_each():
    tok = load_model("tiny").tokenizer
    for word in tiny_words():
        assert len(tok(word)["input_ids"]) == 3, word  # BOS word EOS
    for text in prompts("ct") + prompts("photo"):
        assert len(tok(text)["input_ids"]) == len(text.split()) + 2, text


def test_tiny_tokenizer_never_emits_eos_inside_a_prompt():
    # Unknown text must not map to the unknown token (= EOS), or EOS pooling picks the wrong position.
    tok = load_model("tiny").tokenizer
    ids = tok("zygomatic Größe 42 cm³!")["input_ids"]
    eos = tok.convert_tokens_to_ids(EOS)
    assert ids[-1] == eos and eos not in ids[:-1] and len(ids) > 5


def test_tiny_text_config_matches_tokenizer():
    loaded = load_model("tiny")
    tc, tok = loaded.model.config.text_config, loaded.tokenizer
    assert tc.eos_token_id == tok.eos_token_id != 2
    assert tc.bos_token_id == tok.bos_token_id
    assert tc.vocab_size == len(tok)


def test_saved_model_loads_back_as_a_folder(tmp_path, inputs):
    loaded = load_model("tiny", image_size=64)
    save_model(loaded, tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    assert (again.image_size, again.mean, again.std) == (64, loaded.mean, loaded.std)
    names = [o.name for o in ORGANS]
    assert torch.equal(fw.tokenize(again, names)["input_ids"], fw.tokenize(loaded, names)["input_ids"])
    with torch.no_grad():
        a, b = (
            fw.forward(
                m.model,
                inputs["pixel_values"],
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
            )
            for m in (loaded, again)
        )
    assert torch.equal(a, b)


def test_image_size_override_and_validation():
    assert load_model("tiny", image_size=160).image_size == 160
    with pytest.raises(InputError, match="multiple of 16"):
        load_model("tiny", image_size=100)


def test_unreachable_hub_id_is_one_line_naming_it_and_the_way_out():
    with pytest.raises(InputError) as err:
        load_model("CIDAS/clipseg-rd64-refined")  # HF_HUB_OFFLINE=1 in tests/conftest.py
    msg = err.value.message
    assert "\n" not in msg and msg.startswith("CIDAS/clipseg-rd64-refined:") and "--model" in msg


def test_missing_or_foreign_folder(tmp_path):
    with pytest.raises(InputError, match="not a model folder"):
        load_model(str(tmp_path / "nothing-here"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="is a .bert. model"):
        load_model(str(tmp_path / "cfg"))


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_reference_config_has_the_published_size(with_tokenizer, tokenizer):
    # CIDAS/clipseg-rd64-refined has 150.7M parameters; built on the meta device, no memory.
    # The tokenizer's ids change which position is pooled, never a size.
    from transformers import CLIPSegForImageSegmentation

    with torch.device("meta"):
        model = CLIPSegForImageSegmentation(reference_config(tokenizer=tokenizer if with_tokenizer else None))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 150.7
    assert CLIPSeg().vision_depth(model) == 10  # the decoder reads up to layer 9 of 12
    assert model.config.text_config.vocab_size == 49408


def test_reference_config_pools_at_the_given_tokenizers_eos(tokenizer):
    # CLIP's pooling reads the first eos_token_id; with CLIP's 49407 and the tiny tokenizer (EOS 762)
    # it would read BOS, and all 13 organ prompts would embed alike.
    tc = reference_config(tokenizer=tokenizer).text_config
    assert (tc.bos_token_id, tc.eos_token_id, tc.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert reference_config().text_config.eos_token_id == 49407  # CLIP's own, for CLIP's tokenizer
    assert CLIPSeg().reference_config(tokenizer=tokenizer).text_config.eos_token_id == tokenizer.eos_token_id


def test_reference_config_refuses_a_tokenizer_it_cannot_pool_with(tokenizer):
    from transformers import CLIPSegTextConfig

    from clipseg_bench.model.families.clipseg import use_tokenizer_ids

    with pytest.raises(ValueError, match="763 tokens, the text config's vocabulary 100"):
        use_tokenizer_ids(CLIPSegTextConfig(vocab_size=100), tokenizer)

    class LegacyIds:  # eos id 2: HF would pool at the highest token id instead
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

        def __len__(self):
            return 10

    with pytest.raises(ValueError, match="cannot drive CLIP's EOS pooling"):
        use_tokenizer_ids(CLIPSegTextConfig(), LegacyIds())


def test_prompt_separation_sees_prompts_that_embed_alike(tokenizer):
    texts = prompts("name")
    tokens = fw.tokenize(tokenizer, texts)
    ok = fw.prompt_separation(build_tiny(), tokens["input_ids"], tokens["attention_mask"])
    assert ok["prompts"] == 13 and ok["distinct"] and ok["separation"] > 100 * ok["tolerance"]
    # The bug of issue 24: an eos id the tokenizer never emits pools BOS for every prompt.
    config = tiny_config()
    config.text_config.eos_token_id = 49407
    bad = fw.prompt_separation(build_tiny(config), tokens["input_ids"], tokens["attention_mask"])
    assert not bad["distinct"] and bad["separation"] == 0.0
