"""A torchtune ``TransformerDecoder`` whose SUPRA layers run without masks or length limits."""

from typing import List, Optional, Union

import torch
from torchtune.modules import TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.generation import get_position_ids_from_padding_mask

from supra.modules.attention import LinearAttention


def is_linear_layer(layer: torch.nn.Module) -> bool:
    """True for a decoder layer whose attention is SUPRA linear attention."""
    return isinstance(getattr(layer, "attn", None), LinearAttention)


class SupraLayer(TransformerSelfAttentionLayer):
    """torchtune's pre-norm block that also hands packed-document boundaries (``cu_seqlens``) to
    its attention. It adds no state, so linearize can switch a loaded block to it in place."""

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """[B, T, D] -> [B, T, D]; see ``LinearAttention.forward`` for the arguments."""
        h = self.sa_scale(self.attn(self.sa_norm(x), mask=mask, input_pos=input_pos, cu_seqlens=cu_seqlens)) + x
        return h + self.mlp_scale(self.mlp(self.mlp_norm(h)))


class SupraDecoder(TransformerDecoder):
    """``TransformerDecoder`` for SUPRA and hybrid (some layers softmax) models.

    Differences from torchtune's decoder: no mask is needed once caches are set up (a linear
    layer's state replaces the KV cache and is causal by construction); inputs may be longer
    than ``max_seq_len`` when every layer is linear; and ``padding_mask`` [B, T] (True = real
    token, left padding) makes a padded batch give each sequence the logits it gets alone.

    It adds no state of its own, so ``supra.convert.linearize`` can turn a loaded torchtune
    decoder into one in place.
    """

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        encoder_input: Optional[torch.Tensor] = None,
        encoder_mask: Optional[torch.Tensor] = None,
        logits_to_keep: int = 0,
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            tokens (torch.Tensor): token ids [B, T].
            mask (Optional[torch.Tensor]): torchtune attention mask [B, T, S] for the softmax layers
                of a hybrid model (required there once caches are set up); SUPRA layers ignore it.
            input_pos (Optional[torch.Tensor]): positions [B, T] or [T]. SUPRA layers default to
                counting real tokens from their caches.
            padding_mask (Optional[torch.Tensor]): [B, T] bool, True for real tokens, pads on the left.
            cu_seqlens (Optional[torch.Tensor]): packed-document boundaries over the B * T flattened
                tokens (all-linear models, parallel mode): each document starts from an empty state.
                Pass ``input_pos`` restarting at each document too.
            encoder_input (Optional[torch.Tensor]): passed through to the layers.
            encoder_mask (Optional[torch.Tensor]): passed through to the layers.
            logits_to_keep (int): compute logits for the last this many positions only (0: all).
                A prefill needs the last position's alone, and the vocabulary projection of every
                prompt position would be a large share of its cost.

        Returns:
            Union[torch.Tensor, List[torch.Tensor]]: logits [B, T, vocab] (float32; [B,
            logits_to_keep, vocab] if set), or a list of hidden states followed by the logits when
            ``output_hidden_states`` is set.

        Raises:
            ValueError: when a hybrid model gets more than ``max_seq_len`` tokens, or runs with
                caches but without a mask for its softmax layers.
        """
        linear = [is_linear_layer(layer) for layer in self.layers]
        softmax_mask, softmax_pos = mask, input_pos
        if cu_seqlens is not None and not all(linear):
            raise ValueError("cu_seqlens (packed documents) needs an all-linear model; softmax layers would need a block mask")
        if not all(linear):
            softmax_mask, softmax_pos = self._softmax_inputs(tokens, mask, input_pos, padding_mask)
        linear_pos = input_pos
        if input_pos is None and any(linear):
            # Every SUPRA layer has consumed the same tokens: count their positions once, not per layer.
            linear_pos = self.layers[linear.index(True)].attn.positions(*tokens.shape, tokens.device, padding_mask)
        h = self.tok_embeddings(tokens)
        hidden = []
        for i, (layer, is_linear) in enumerate(zip(self.layers, linear)):
            if i in self.output_hidden_states:
                hidden.append(h)
            if is_linear:
                h = layer(h, mask=padding_mask, input_pos=linear_pos, cu_seqlens=cu_seqlens)
            else:
                h = layer(h, mask=softmax_mask, input_pos=softmax_pos, encoder_input=encoder_input, encoder_mask=encoder_mask)
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position); got {logits_to_keep}")
        output = self.unembed(h[:, -logits_to_keep:] if logits_to_keep else h)
        return output if not hidden else [*hidden, output]

    def _softmax_inputs(self, tokens, mask, input_pos, padding_mask):
        """Mask and positions for the softmax layers of a hybrid model."""
        B, T = tokens.shape
        if T > self.max_seq_len:
            raise ValueError(
                f"{T} tokens exceed max_seq_len={self.max_seq_len}, the limit of this hybrid model's "
                "softmax layers (only all-linear models have unbounded context)"
            )
        if self.caches_are_enabled() and mask is None:
            raise ValueError(
                "this hybrid model has softmax layers with KV caches: pass their attention mask "
                "[B, T, max_cache_len] as `mask` (SUPRA layers need none)"
            )
        if padding_mask is not None and mask is None:
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=tokens.device))
            # A pad row that sees nothing would give NaN: let every token see itself.
            mask = (causal & padding_mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=tokens.device)
        if padding_mask is not None and input_pos is None:
            input_pos = get_position_ids_from_padding_mask(padding_mask)
        return mask, input_pos
