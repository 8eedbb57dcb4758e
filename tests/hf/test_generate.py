"""transformers ``generate`` on supra models: one chunked prefill, then recurrent decode.

References, none of which runs the code under test: the argmax of repeated full forwards of the
supra decoder itself (no cache, no padding), supra's own ``supra.generation.generate``, the same
full forwards fed to transformers' own logits processors and ``torch.multinomial`` for sampling,
and transformers' beam search with ``use_cache=False`` (full forwards every step, so no state is
ever reordered) for beam search.
"""

import copy

import hf_tiny
import pytest
import torch
import transformers
from hf_tiny import VOCAB, tiny_hybrid, tiny_supra, wrap
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import supra.modules.attention
from supra.generation import generate as supra_generate
from supra.hf import SupraCache

PAD = 0
NEW = 6
MODELS = {
    "openlm_folder": None,  # filled from the fixture in _model()
    "gqa": lambda: tiny_supra(),
    "mha_qk_norm_retnet": lambda: tiny_supra(seed=1, num_kv_heads=4, qk_norm=True, decay="retnet"),
    "tied": lambda: tiny_supra(seed=2, tie_word_embeddings=True),
    "hybrid": lambda: tiny_hybrid(),
}


def _model(name, tmp_path):
    if name == "openlm_folder":
        folder, _, _ = hf_tiny.write_openlm_folder(tmp_path / "openlm", seed=5)
        return AutoModelForCausalLM.from_pretrained(folder)
    return wrap(MODELS[name]())


def _prompts(lengths=(7, 3, 12), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def _last_logits(decoder, sequence):
    """Last-position logits of one parallel forward of the whole sequence (no cache)."""
    assert not decoder.caches_are_setup()
    return decoder(torch.tensor([sequence]))[:, -1].float()


def _reference_greedy(decoder, prompt, max_new_tokens):
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        sequence.append(int(_last_logits(decoder, sequence).argmax(-1)))
    return sequence[len(prompt):]


def _hf_new_tokens(model, prompt, **kwargs):
    out = model.generate(torch.tensor([prompt]), pad_token_id=PAD, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", MODELS.keys())
def test_greedy_equals_full_forwards_and_supra_generate(name, tmp_path):
    model = _model(name, tmp_path)
    for prompt in _prompts():
        expected = _reference_greedy(model.model, prompt, NEW)
        assert _hf_new_tokens(model, prompt, max_new_tokens=NEW, do_sample=False) == expected
        assert supra_generate(model.model, [prompt], max_new_tokens=NEW) == [expected]


@pytest.mark.parametrize("name", ["openlm_folder", "hybrid"])
def test_batched_left_padded_prompts_equal_each_prompt_alone(name, tmp_path):
    model = _model(name, tmp_path)
    prompts = _prompts()
    ids, mask = _left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    assert out.shape == (len(prompts), ids.shape[1] + NEW)
    for row, prompt in enumerate(prompts):
        assert out[row, ids.shape[1]:].tolist() == _reference_greedy(model.model, prompt, NEW)


def _reference_sampled(decoder, prompt, max_new_tokens, seed, temperature, top_k, top_p, repetition_penalty):
    """transformers' processors, in the order generate applies them, on full-forward logits."""
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty),
        TemperatureLogitsWarper(temperature),
        TopKLogitsWarper(top_k=top_k),
        TopPLogitsWarper(top_p=top_p),
    ])
    torch.manual_seed(seed)
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        scores = processors(torch.tensor([sequence]), _last_logits(decoder, sequence))
        sequence.append(int(torch.multinomial(scores.softmax(dim=-1), num_samples=1)))
    return sequence[len(prompt):]


@pytest.mark.parametrize("name", ["openlm_folder", "hybrid"])
def test_sampling_equals_transformers_processors_on_full_forwards(name, tmp_path):
    model = _model(name, tmp_path)
    sampling = dict(temperature=0.8, top_k=20, top_p=0.8, repetition_penalty=1.3)
    prompt = _prompts()[0]
    runs = []
    for seed in (0, 1):
        expected = _reference_sampled(model.model, prompt, 8, seed, **sampling)
        torch.manual_seed(seed)
        assert _hf_new_tokens(model, prompt, max_new_tokens=8, do_sample=True, **sampling) == expected
        runs.append(expected)
    # The seeds give different draws: the comparison is not greedy in disguise.
    assert runs[0] != runs[1]


def test_prefill_is_one_chunked_pass_then_one_step_per_token(monkeypatch, openlm_folder):
    # Tokens each SUPRA layer's attention reads per call: the chunked op, or the in-place one-token step.
    calls = []
    for name in ("linear_attention", "recurrent_step_"):
        function = getattr(supra.modules.attention, name)

        def spy(q, *args, _function=function, **kwargs):
            calls.append(q.shape[1])
            return _function(q, *args, **kwargs)

        monkeypatch.setattr(supra.modules.attention, name, spy)
    model = AutoModelForCausalLM.from_pretrained(openlm_folder[0])
    ids, mask = _left_padded(_prompts((30, 17)))
    model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD)
    layers = len(model.model.layers)
    assert calls == [30] * layers + [1] * layers * (NEW - 1)


def test_stop_strings_and_max_new_tokens(openlm_folder):
    folder, _, _ = openlm_folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    prompt = _prompts()[0]
    free = _reference_greedy(model.model, prompt, 10)
    # A generated word piece (no word boundary) as the stop string; generation must end at the
    # first step whose text ends with it.
    pieces = [t for t in tokenizer.convert_ids_to_tokens(free[2:]) if t.isalpha() and len(t) > 1]
    assert pieces, "no multi-letter word piece generated: pick another prompt"
    stop_string = pieces[0]
    stop_at = next(k for k in range(len(free)) if tokenizer.decode(prompt + free[: k + 1]).endswith(stop_string))
    got = _hf_new_tokens(model, prompt, max_new_tokens=10, do_sample=False, stop_strings=[stop_string], tokenizer=tokenizer)
    assert got == free[: stop_at + 1]
    assert _hf_new_tokens(model, prompt, max_new_tokens=3, do_sample=False) == free[:3]


def test_eos_ends_a_row_and_pads_it_while_others_continue(openlm_folder):
    model = AutoModelForCausalLM.from_pretrained(openlm_folder[0])
    prompts = _prompts((7, 12))
    free = [_reference_greedy(model.model, p, NEW) for p in prompts]
    eos = free[0][1]
    assert eos not in free[1], "pick prompts whose second row never produces the first row's eos"
    ids, mask = _left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    new = out[:, ids.shape[1]:].tolist()
    stop = free[0].index(eos) + 1
    assert new[0] == free[0][:stop] + [PAD] * (NEW - stop)
    assert new[1] == free[1]


@pytest.mark.parametrize("name", ["openlm_folder", "hybrid"])
def test_beam_search_reorders_states_like_full_forwards(name, tmp_path, monkeypatch):
    model = _model(name, tmp_path)
    reordered = []
    reorder = SupraCache.reorder_cache

    def spy(self, beam_idx):
        reordered.append(not torch.equal(beam_idx.cpu(), torch.arange(len(beam_idx))))
        return reorder(self, beam_idx)

    monkeypatch.setattr(SupraCache, "reorder_cache", spy)
    ids, mask = _left_padded(_prompts((7, 4)))
    options = dict(attention_mask=mask, max_new_tokens=NEW, num_beams=3, num_return_sequences=2, do_sample=False,
                   pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(ids, **options)
    assert any(reordered), "no beam was ever moved: the test would not exercise reorder_cache"
    full = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.sequences_scores, full.sequences_scores, rtol=1e-5, atol=1e-5)


def test_generate_continues_from_a_returned_cache(openlm_folder):
    model = AutoModelForCausalLM.from_pretrained(openlm_folder[0])
    prompt = torch.tensor([_prompts()[0]])
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    cache = first.cache if "cache" in first else first.past_key_values
    assert isinstance(cache, SupraCache) and cache.get_seq_length() == first.sequences.shape[1] - 1
    follow_up = torch.cat([first.sequences, torch.tensor([[5, 9]])], dim=1)
    for name in ("past_key_values", "cache"):
        # A copy per name: generate updates the cache it is given.
        continued = model.generate(follow_up, max_new_tokens=4, do_sample=False, pad_token_id=PAD, **{name: copy.deepcopy(cache)})
        fresh = model.generate(follow_up, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        assert torch.equal(continued, fresh), name


@pytest.mark.parametrize("lengths", [(12, 12), (7, 3, 12)], ids=["same_lengths", "left_padded"])
@pytest.mark.parametrize("name", ["openlm_folder", "hybrid"])
def test_transformers_chunked_prefill_with_a_passed_cache(name, lengths, tmp_path):
    # generate(prefill_chunk_size=...) needs a cache before the first forward: pass an empty one.
    if len(set(lengths)) > 1 and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x chunked prefill passes positions that ignore the padding")
    model = _model(name, tmp_path)
    prompts = _prompts(lengths)
    ids, mask = _left_padded(prompts)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                         prefill_chunk_size=4, past_key_values=SupraCache())
    for row, prompt in enumerate(prompts):
        assert out[row, ids.shape[1]:].tolist() == _reference_greedy(model.model, prompt, NEW)


def test_assisted_decoding_is_refused(openlm_folder):
    model = AutoModelForCausalLM.from_pretrained(openlm_folder[0])
    with pytest.raises(ValueError, match="stateful"):
        model.generate(torch.tensor([_prompts()[0]]), assistant_model=model, max_new_tokens=3, pad_token_id=PAD)
