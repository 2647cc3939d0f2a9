"""VILA-U preference-data token ids vs vila-u's own tokenisation: the slow sentencepiece tokenizer vila-u loads
(``AutoTokenizer(use_fast=False, legacy=False)``, see ``_vila_u_torch.vila_u_slow_tokenizer``) on a tiny
LLaMA-style ``tokenizer.model``, with ``tokenizer_image_token`` cutting vila-u's conversation text at
``<image>``. fairjax reads the same folder with ``vila_u_generate.load_tokenizer``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import transformers  # noqa: F401
import sentencepiece  # noqa: F401

import _vila_u_torch as ref  # noqa: E402
from fairjax.vila_u import generate as vg  # noqa: E402
from fairjax.vila_u import data as vd  # noqa: E402
from fairjax.models import vila_u_tokenizer as vtok  # noqa: E402

IMAGE_TOKEN_INDEX = -200  # vila-u constants.IMAGE_TOKEN_INDEX
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")  # vila-u conv_vicuna_v1.system


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    llm = str(tmp_path_factory.mktemp("vila_u_data") / "llm")
    ref.write_sentencepiece_tokenizer(llm)
    return vg.load_tokenizer(llm), ref.vila_u_slow_tokenizer(llm)


def vila_u_tokenizer_image_token(slow, prompt):
    """vila-u ``mm_utils.tokenizer_image_token``: BOS, then each chunk between ``<image>`` tokenised with its BOS
    dropped, ``IMAGE_TOKEN_INDEX`` for each ``<image>``."""
    out = [slow.bos_token_id]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            out.append(IMAGE_TOKEN_INDEX)
        out.extend(slow(chunk, add_special_tokens=False).input_ids)
    return out


def vila_u_conversation(messages):
    """vila-u ``conv_vicuna_v1.get_prompt()`` (SeparatorStyle.TWO, sep " ", sep2 "</s>"); a None / empty message
    is ``role + ":"``."""
    seps, out = [" ", "</s>"], SYSTEM + " "
    for i, (role, msg) in enumerate(messages):
        out += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
    return out


def test_loader_is_the_generation_loader():
    assert not hasattr(vd, "load_tokenizer")  # one loader: fairjax.models.vila_u_tokenizer.load_tokenizer
    assert vd.VICUNA_SYSTEM is vtok.VICUNA_SYSTEM and vd.generation_prompt("x") == vtok.conversation_prompt("x")


def test_generation_and_unconditional_ids_match_vila_u(toks):
    tok, slow = toks
    for caption in ["a photo of a doctor", "  portrait of a firefighter\t", "caf\u00e9 \U0001f600 2024", " ", ""]:
        # tokenize_conversation strips the message, adds the gpt turn (None) and " <im_start>"
        text = vila_u_conversation([("USER", caption.strip()), ("ASSISTANT", None)]) + " <im_start>"
        np.testing.assert_array_equal(vd.generation_ids(tok, caption), vila_u_tokenizer_image_token(slow, text))
    # generate_image_content's cfg_conversation: human message " "
    uncond = vila_u_tokenizer_image_token(slow, f"{SYSTEM} USER:ASSISTANT: <im_start>")
    np.testing.assert_array_equal(vd.unconditional_ids(tok), uncond)
    assert vd.unconditional_ids(tok).tolist() == tok.unconditional_ids()


def test_mdpo_ids_are_vila_u_conversation_cut_at_the_image(toks):
    tok, slow = toks
    for question, answer in [("what is this person's job?", "the person is a doctor"),
                             ("  describe the image \n", "a firefighter, at night 2024"), ("job?", "nurse")]:
        rec = vd.mdpo_ids(tok, tok.eos_id, question, answer, "a pilot")
        # preprocess_multimodal: "<image>\n<question>" with mm_use_im_start_end; preprocess_v1 conversation
        human = "<im_start><image><im_end>\n" + question.strip()
        want = vila_u_tokenizer_image_token(slow, vila_u_conversation([("USER", human), ("ASSISTANT", answer)]))
        cut = want.index(IMAGE_TOKEN_INDEX)
        np.testing.assert_array_equal(rec["pre_ids"], want[:cut])
        np.testing.assert_array_equal(np.concatenate([rec["post_ids"], rec["chosen_ids"]]), want[cut + 1:])
        assert rec["chosen_ids"][-1] == slow.eos_token_id and rec["post_ids"][0] != slow.bos_token_id
        rejected = vila_u_tokenizer_image_token(slow, vila_u_conversation([("USER", human), ("ASSISTANT", "a pilot")]))
        np.testing.assert_array_equal(np.concatenate([rec["post_ids"], rec["rejected_ids"]]),
                                      rejected[rejected.index(IMAGE_TOKEN_INDEX) + 1:])


def test_pair_manifest_prompts_use_the_tokenizer(toks, tmp_path):
    tok, slow = toks
    codes = np.zeros((4, 2), int).tolist()
    line = {"a": {"id": 0, "prompt": "a photo of a chef", "group": "male", "codes": codes},
            "b": {"id": 0, "prompt": "a photo of a chef", "group": "female", "codes": codes}}
    blank = {"a": {"id": 1, "codes": codes}, "b": {"id": 1, "codes": codes}}  # no prompt: unconditional
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(line) + "\n" + json.dumps(blank) + "\n")
    pairs = vd.read_pair_manifest(str(path), tok)
    text = f"{SYSTEM} USER: a photo of a chef ASSISTANT: <im_start>"
    np.testing.assert_array_equal(pairs[0]["prompt_ids"], vila_u_tokenizer_image_token(slow, text))
    np.testing.assert_array_equal(pairs[1]["prompt_ids"],
                                  vila_u_tokenizer_image_token(slow, f"{SYSTEM} USER:ASSISTANT: <im_start>"))
