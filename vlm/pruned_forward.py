"""The pruned LLaVA forward and greedy generation in the four evaluation modes (issue 11 items 2 and 5).

origin: the plain Hugging Face model (no merge, no pruning; padding-aware RoPE positions).
train:  merger (as the caller left its train/eval mode) + the decider's soft keep masks as an additive
        log(keep + 1e-6) key bias in every layer from the pruning layer on (differentiable, sequence intact).
soft:   binary keep masks as a -inf key bias on the dropped vision tokens from the pruning layer on.
hard:   dropped tokens removed from the sequence at the pruning layer (later layers run fewer tokens);
        original RoPE positions kept; under a KV cache each layer holds a cache of its own length.
Merging (any mode but origin, when a merger is given) shrinks each sample's image span from N to M
placeholders before the LLM; positions are then re-counted over the merged prompt (the merger's
`positions="recount"`, the seed's behaviour) or each centre keeps its token's original RoPE position and
the text after the image keeps its own (`positions="original"`).
static_keep (hard mode): when every sample keeps fixed counts (M centres, a decider with `static_keep_count`),
        `static_prefill` runs the same computation with every shape taken from a `StaticPlan` and no host
        sync, so it can be captured in a CUDA graph (vlm/static_plan.py, vlm/graphed_prefill.py).
Not supported: flash-attention / flex (the layers need 4-D additive masks: sdpa or eager), gradient
checkpointing of the decoder (recomputation would re-run the pruning hooks), Hugging Face `generate`
(use `pruned_generate`: greedy), more than one image per sample.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from vlm.hard_drop import gather_tokens, left_pack, padding_positions
from vlm.layer_hooks import DecodeState, PrefillState, layer_hooks
from vlm.llava import image_features, llava_parts, question_mask, vision_positions
from vlm.static_plan import StaticPlan, static_plan

MODES = ("origin", "train", "soft", "hard")
ATTENTION = ("sdpa", "eager")  # implementations that take the per-layer 4-D additive mask


@dataclass
class PrunedOutput:
    """logits [B, S', V]; labels [B, S'] aligned to logits (-100 on padding) or None; hidden_states (inputs of
    the L decoder layers + the final normed output, [B, S_l, D] each) and hidden_masks (bool [B, S_l], real
    and not dropped) when asked; merge (MergeOutput | None); keep {layer: [B, n_layer]} and keep_valid {layer: bool
    [B, n_layer]} (which of those n_layer slots are vision tokens the decision was over); vision_tokens_per_layer
    (L floats: mean kept vision tokens per sample entering each layer); past_key_values (the cache or None);
    token_mask bool [B, S'] (real tokens of the logits' positions)."""
    logits: torch.Tensor
    labels: Optional[torch.Tensor]
    hidden_states: Optional[tuple] = None
    hidden_masks: Optional[list] = None
    merge: object = None
    keep: Dict[int, torch.Tensor] = field(default_factory=dict)
    vision_tokens_per_layer: List[float] = field(default_factory=list)
    past_key_values: object = None
    token_mask: Optional[torch.Tensor] = None
    keep_valid: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Prompt:
    """The LLM input after merging: embeds [B, S, D], valid / vision / question bool [B, S], labels, and
    positions long [B, S] (RoPE position ids; None = re-counted over the valid tokens)."""
    embeds: torch.Tensor
    valid: torch.Tensor
    vision: torch.Tensor
    question: torch.Tensor
    labels: Optional[torch.Tensor]
    merge: object
    positions: Optional[torch.Tensor] = None


def equivalent_token_budget(vision_tokens_per_layer: Sequence[float]) -> float:
    """T̄ = Σ_l n_l / L, the mean vision tokens over the L decoder layers (VLM.md: 576 tokens for 10 of 32
    layers, then 144 -> 279). Raises ValueError on an empty sequence."""
    if len(vision_tokens_per_layer) == 0:
        raise ValueError("vision_tokens_per_layer is empty: need one count per decoder layer")
    return float(sum(vision_tokens_per_layer)) / len(vision_tokens_per_layer)


def _attention(model) -> str:
    return getattr(model.config.text_config, "_attn_implementation", None) or "sdpa"


def _check(model, mode: str, decider) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    attention = _attention(model)
    if mode != "origin" and attention not in ATTENTION:
        raise ValueError(f"attn_implementation={attention!r}: pruning needs one of {list(ATTENTION)} "
                         f"(each layer gets its own 4-D additive mask)")
    depth = llava_parts(model).num_layers
    layers = list(getattr(decider, "layers", [])) if decider is not None else []
    bad = [layer for layer in layers if not 0 <= int(layer) < depth]
    if bad:
        raise ValueError(f"pruning_layers {bad} outside the model's {depth} decoder layers (0..{depth - 1})")


def _cache_name(language_model) -> str:
    """The decoder's KV-cache keyword: `cache` (transformers >= 5.2x) or `past_key_values` (older 5.x)."""
    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _prompt(model, batch: dict, merger, temperature: float, question: Optional[torch.Tensor] = None,
            static: bool = False) -> _Prompt:
    """Embed the batch, merge the N image features into M (each sample's image span shrinks from N to M
    placeholders, dropping the span's last N - M slots; every row loses the same count, so left padding
    stays aligned) and scatter the (merged) image features into the placeholders.

    question: bool [B, S] overriding the derived question mask; static: the batch was checked by `static_plan`
    (no host sync here). Raises ValueError naming `input_ids` when a sample does not hold exactly N image
    placeholders (checked only when not static)."""
    image_token_id = model.config.image_token_id
    ids, valid, labels = batch["input_ids"], batch["attention_mask"].bool(), batch.get("labels")
    vision = vision_positions(ids, image_token_id)
    features = image_features(model, batch["pixel_values"])
    counts = vision.sum(dim=1)
    if not static and bool((counts != features.shape[1]).any()):
        raise ValueError(f"input_ids: each sample needs {features.shape[1]} image_token_id ({image_token_id}) "
                         f"placeholders, got {counts.tolist()}")
    question = question_mask(batch, image_token_id) if question is None else question
    embeds = llava_parts(model).language_model.embed_tokens(ids)
    merge = positions = None
    if merger is not None:
        merge = merger(features, temperature, question=embeds, question_mask=question)
        surplus = vision & (vision.long().cumsum(dim=1) > merge.num_centres)
        index = left_pack(~surplus, ids.shape[1] - features.shape[1] + merge.num_centres)[0]  # S - (N - M) each
        if getattr(merger, "positions", "recount") == "original":  # each token keeps its own RoPE position
            original = padding_positions(valid)
            span_start = original.masked_fill(~vision, original.shape[1]).min(dim=1, keepdim=True).values
            positions = gather_tokens(original, index)
        embeds, valid, vision, question = (gather_tokens(t, index) for t in (embeds, valid, vision, question))
        labels = None if labels is None else gather_tokens(labels, index)
        features = merge.merged
        if positions is not None:  # centre j sits where its token did: span start + its index in the image
            positions = positions.masked_scatter(vision, (span_start + merge.centres).to(positions.dtype))
    embeds = embeds.masked_scatter(vision[..., None], features.to(embeds.dtype))
    return _Prompt(embeds, valid, vision, question, labels, merge, positions)


def _prefill(model, prompt: _Prompt, mode: str, decider, temperature: float, output_hidden_states: bool,
             use_cache: bool, plan: Optional[StaticPlan] = None, last_only: bool = False):
    """Run the decoder under the pruning hooks (static shapes from `plan` when given; logits of the last
    position only with `last_only`). Returns (PrunedOutput, PrefillState)."""
    parts = llava_parts(model)
    language_model = parts.language_model
    positions = padding_positions(prompt.valid) if prompt.positions is None else prompt.positions
    state = PrefillState(mode if mode != "origin" else "hard", decider, temperature, language_model.rotary_emb,
                         prompt.valid, prompt.vision, prompt.question, positions, prompt.labels,
                         output_hidden_states, plan, always_mask=_attention(model) == "eager")
    with layer_hooks(language_model, state.hook):
        output = language_model(inputs_embeds=prompt.embeds, attention_mask=None, position_ids=positions,
                                use_cache=use_cache)
    final = output.last_hidden_state
    hidden = masks = None
    if output_hidden_states:
        hidden, masks = tuple(state.hidden_inputs) + (final,), list(state.hidden_masks) + [state.live]
    counts = plan.tokens_per_layer() if plan is not None else torch.stack(state.vision_counts).tolist()
    logits = parts.lm_head(final[:, -1:] if last_only else final)
    result = PrunedOutput(logits=logits, labels=state.labels, hidden_states=hidden,
                          hidden_masks=masks, merge=prompt.merge, keep=state.keep, keep_valid=state.keep_valid,
                          vision_tokens_per_layer=counts,
                          past_key_values=_cache_of(output) if use_cache else None, token_mask=state.valid)
    return result, state


def _origin_forward(model, batch: dict, output_hidden_states: bool, use_cache: bool) -> PrunedOutput:
    """The plain Hugging Face forward with padding-aware positions (as generate computes them)."""
    valid = batch["attention_mask"].bool()
    output = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                   attention_mask=batch["attention_mask"], position_ids=padding_positions(valid),
                   output_hidden_states=output_hidden_states, use_cache=use_cache, return_dict=True)
    parts = llava_parts(model)
    tokens = float(vision_positions(batch["input_ids"], model.config.image_token_id).sum(dim=1).float().mean())
    hidden = tuple(output.hidden_states) if output_hidden_states else None
    return PrunedOutput(logits=output.logits, labels=batch.get("labels"), hidden_states=hidden,
                        hidden_masks=[valid] * len(hidden) if hidden is not None else None,
                        vision_tokens_per_layer=[tokens] * parts.num_layers,
                        past_key_values=_cache_of(output) if use_cache else None, token_mask=valid)


def pruned_forward(model, batch: dict, mode: str, decider=None, merger=None, temperature: float = 1.0,
                   output_hidden_states: bool = False, use_cache: bool = False,
                   static_keep: bool = False) -> PrunedOutput:
    """One forward of a LLaVA model in `mode` (see the module docstring) over a collated, left-padded batch.

    decider: a keep decider (`layers`, `decide(...)`) or None (no layer pruning); merger: a
    LearnableTokenMerger or None. Both are ignored in `origin`. Gradients are not disabled here.
    Raises ValueError for an unknown mode, a decider layer outside the model's depth (naming
    `pruning_layers`), an attention implementation other than sdpa / eager (naming `attn_implementation`),
    or a sample without exactly N image placeholders (naming `input_ids`).
    static_keep (hard mode only): check the batch and the decider's fixed counts once (`static_plan`, one host
    sync; ValueError when the counts are not fixed) and run `static_prefill` with that plan."""
    _check(model, mode, decider)
    if static_keep:
        if mode != "hard":
            raise ValueError(f"static_keep needs mode='hard', got mode={mode!r}")
        plan = static_plan(model, batch, decider, merger)
        return static_prefill(model, batch, plan, decider, merger, temperature, output_hidden_states, use_cache)
    if mode == "origin":
        return _origin_forward(model, batch, output_hidden_states, use_cache)
    prompt = _prompt(model, batch, merger, temperature)
    return _prefill(model, prompt, mode, decider, temperature, output_hidden_states, use_cache)[0]


def static_prefill(model, batch: dict, plan: StaticPlan, decider=None, merger=None, temperature: float = 1.0,
                   output_hidden_states: bool = False, use_cache: bool = False,
                   last_only: bool = False) -> PrunedOutput:
    """The hard-mode `pruned_forward` with every shape taken from `plan` (from `static_plan` on a batch of the
    same layout): no host sync, no data-dependent shape, so it can be captured in a CUDA graph or compiled
    with fullgraph=True. Equals the dynamic hard path when the decider keeps the plan's counts (it must: a
    decider keeping other counts gives wrong shapes or garbage, unchecked here). last_only: logits of the
    last position only, [B, 1, V]. With decider = merger = None it is the origin model's prefill through the
    same hooks (no mask without padding: SDPA causal)."""
    prompt = _prompt(model, batch, merger, temperature, static=True)
    return _prefill(model, prompt, "hard", decider, temperature, output_hidden_states, use_cache, plan,
                    last_only)[0]


def _decode_step(model, tokens: torch.Tensor, state: DecodeState, cache) -> torch.Tensor:
    """Next-token logits [B, V] for tokens [B, 1] appended to every layer's cache."""
    parts = llava_parts(model)
    language_model = parts.language_model
    embeds = language_model.embed_tokens(tokens)
    with layer_hooks(language_model, state.hook):
        output = language_model(inputs_embeds=embeds, attention_mask=None, position_ids=state.positions,
                                use_cache=True, **{_cache_name(language_model): cache})
    return parts.lm_head(output.last_hidden_state[:, -1])


@torch.no_grad()
def pruned_generate(model, batch: dict, mode: str, decider=None, merger=None, max_new_tokens: int = 8,
                    use_cache: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """Greedy decoding of `max_new_tokens` tokens per sample -> long [B, max_new_tokens] (no early stop);
    `generate_counted` also returns the prompt's vision tokens per layer. See `generate_counted`."""
    return generate_counted(model, batch, mode, decider, merger, max_new_tokens, use_cache, temperature)[0]


@torch.no_grad()
def generate_counted(model, batch: dict, mode: str, decider=None, merger=None, max_new_tokens: int = 8,
                     use_cache: bool = True, temperature: float = 1.0) -> Tuple[torch.Tensor, List[float]]:
    """(long [B, max_new_tokens] greedy tokens, the L floats of `PrunedOutput.vision_tokens_per_layer` of the
    prompt's prefill): one prefill gives both, so an evaluation needs no second forward for the counts.
    temperature: the merger's / decider's τ (the merger's soft assignment uses it also at eval: pass the
    value training ended at, as for `pruned_forward`).

    The merge and the pruned set are fixed by the prompt: generated tokens are never question tokens, so the
    uncached path (re-running the full prompt + generated tokens each step) takes the same decisions as the
    cached one. With the cache, each layer keeps the cache length it had at prefill (shorter after a hard
    drop) and every new token gets its own mask per layer and position (prompt length + step) — the
    original RoPE positions, continued. `origin` runs the same path with no merger and no decider."""
    _check(model, mode, decider)
    if mode == "origin":
        decider = merger = None
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    question = question_mask(batch, model.config.image_token_id)
    if use_cache:
        output, state = _prefill(model, _prompt(model, batch, merger, temperature, question), mode, decider,
                                 temperature, False, True)
        token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated, positions, layer_bias = [token], state.positions[:, -1:] + 1, state.layer_bias
        masked = [bool((bias != 0).any()) for bias in layer_bias]
        rotary = llava_parts(model).language_model.rotary_emb
        for _ in range(max_new_tokens - 1):
            layer_bias = [torch.cat([bias, bias.new_zeros(bias.shape[0], 1)], dim=1) for bias in layer_bias]
            logits = _decode_step(model, token, DecodeState(layer_bias, masked, positions, rotary),
                                  output.past_key_values)
            token, positions = logits.argmax(dim=-1, keepdim=True), positions + 1
            generated.append(token)
        return torch.cat(generated, dim=1), output.vision_tokens_per_layer
    ids, attention = batch["input_ids"], batch["attention_mask"]
    generated, counts = ids.new_zeros(ids.shape[0], 0), None
    for _ in range(max_new_tokens):
        step = dict(batch, input_ids=torch.cat([ids, generated], dim=1),
                    attention_mask=torch.cat([attention, torch.ones_like(generated)], dim=1))
        step.pop("labels", None)
        step_question = torch.cat([question, torch.zeros_like(generated, dtype=torch.bool)], dim=1)
        output, _ = _prefill(model, _prompt(model, step, merger, temperature, step_question), mode, decider,
                             temperature, False, False)
        generated = torch.cat([generated, output.logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        counts = output.vision_tokens_per_layer if counts is None else counts
    return generated, counts
