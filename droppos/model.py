"""DropPos Vision Transformer: encoder on timm's ViT blocks, position decoder and the DropPos losses.

Implements docs/METHOD.md (Wang et al., "DropPos", NeurIPS 2023), which gives the counts, the formulas, the
[MASK] variants and the two defects of the published smoothing map that are not reproduced here. Shapes are
static and the forward has no host synchronisation, so that torch.compile builds one graph: the counts are fixed
integers, and one random permutation per image (torch.rand + argsort) decides which patches keep their PE, which
lose it and which are removed.

The attentive pass is its own API (`saliency`) because it is the costlier half of a step (ViT-B/16: 35.1 vs
28.3 GFLOPs per image): `forward(imgs, sigma, saliency=model.saliency(imgs))` gives the same loss and gradients
as `forward(imgs, sigma)`, and `compile_step` compiles the two as separate graphs.

Importing this module registers `droppos_vit_{tiny,small,base,large}_patch16`, `droppos_vit_base_patch32`
and `droppos_vit_huge_patch14` with timm.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, PatchEmbed, build_sincos2d_pos_embed, calculate_drop_path_rates, to_2tuple
from timm.models import register_model
from timm.models.vision_transformer import Block

from droppos import UserError

__all__ = [
    "DropPosViT",
    "MASK_TOKEN_TYPES",
    "attentive_weights",
    "compile_step",
    "encoder_state_dict",
    "mask_counts",
    "position_targets",
]

from droppos.recipes import MASK_TOKENS as MASK_TOKEN_TYPES, MODELS, PretrainConfig  # noqa: E402 - the one list (recipes is torch-free)

# sigma**2 is clamped here so that sigma = 0 gives exp(-d^2 / eps) = exactly 0 off the diagonal and 1 on it.
_SIGMA_SQ_EPS = 1e-12

# The encoder sizes are recipes.MODELS (name -> embed_dim, depth, num_heads, patch); `<name>_224` is the stock
# timm ViT of the same layout, which a DropPos encoder exports to.


# ----------------------------------------------------------------------------------------------------------
# Functions shared with pretrain / eval-pos


def mask_counts(num_patches: int, mask_ratio: float, pos_mask_ratio: float) -> tuple[int, int]:
    """(V visible patches, K of them keeping their PE): fixed integers so every tensor shape is static."""
    if not 0.0 <= mask_ratio < 1.0:
        raise UserError(f"mask ratio must be in [0, 1), got {mask_ratio}")
    if not 0.0 <= pos_mask_ratio <= 1.0:
        raise UserError(f"position mask ratio must be in [0, 1], got {pos_mask_ratio}")
    num_visible = math.floor(num_patches * (1.0 - mask_ratio) + 1e-9)
    if num_visible < 1:
        raise UserError(
            f"mask ratio {mask_ratio} leaves no visible patch out of {num_patches}: use a smaller --mask-ratio"
        )
    num_keep_pe = math.floor(num_visible * (1.0 - pos_mask_ratio) + 1e-9)
    return num_visible, num_keep_pe


def grid_sq_distances(grid_hw: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """[L, L] squared Euclidean distance between cells (row-major index i = row * cols + col)."""
    rows, cols = int(grid_hw[0]), int(grid_hw[1])
    r = torch.arange(rows, device=device, dtype=torch.float32)
    c = torch.arange(cols, device=device, dtype=torch.float32)
    cells = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)  # [L, 2] (row, col)
    return (cells[:, None, :] - cells[None, :, :]).pow(2).sum(-1)


def _smooth_targets(sq_dist: torch.Tensor, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
    """Row-normalised Gaussian exp(-d^2 / sigma^2); a tensor sigma keeps torch.compile from recompiling."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sq_dist.device)
    weights = torch.exp(-sq_dist / sigma.square().clamp_min(_SIGMA_SQ_EPS))
    return weights / weights.sum(dim=-1, keepdim=True)


def position_targets(grid_hw: Sequence[int], sigma: Union[float, torch.Tensor]) -> torch.Tensor:
    """[L, L] smoothed position targets on a (rows, cols) grid: row p is the target of the patch at cell p.

    w(p, q) = exp(-||p - q||^2 / sigma^2) over the true 2-D grid, divided by its row sum (so each row sums
    to 1; one-hot at sigma 0). Not the published code's 16x16 map truncated to L columns.
    """
    device = sigma.device if isinstance(sigma, torch.Tensor) else None
    return _smooth_targets(grid_sq_distances(grid_hw, device=device), sigma)


def attentive_weights(cls_feat: torch.Tensor, patch_feats: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, L] softmax over patches of cos(cls, patch) / tau: how salient each patch is to the image.

    Always fp32, also under autocast: a bf16 cosine (3 significant digits) divided by tau = 0.1 would move
    the weights by several percent. The features themselves come in the caller's precision.
    """
    with torch.autocast(cls_feat.device.type, enabled=False):
        cls_feat = F.normalize(cls_feat.float(), dim=-1)
        patch_feats = F.normalize(patch_feats.float(), dim=-1)
        cos = torch.einsum("bd,bld->bl", cls_feat, patch_feats)
        return torch.softmax(cos / tau, dim=-1)


def _block_flops(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Forward FLOPs (2 per multiply-add) of one pre-norm ViT block: qkv + proj + MLP GEMMs, q@k^T and a@v."""
    return 2.0 * tokens * (4 + 2 * mlp_ratio) * dim * dim + 4.0 * tokens * tokens * dim


# ----------------------------------------------------------------------------------------------------------
# The model


class DropPosViT(nn.Module):
    """ViT encoder (timm blocks, fixed 2-D sin-cos PE, [CLS]) with the DropPos position decoder and losses.

    The encoder's parameter names follow timm's VisionTransformer (cls_token, pos_embed, patch_embed.proj,
    blocks.N, norm), so `droppos.export.export_encoder` writes a checkpoint a stock timm ViT loads.
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.75,
        pos_mask_ratio: float = 0.75,
        mask_token: str = "learnable",
        decoder_width: int = 512,
        decoder_depth: int = 2,
        decoder_heads: int = 16,
        attentive: bool = True,
        tau: float = 0.1,
        aux_mae: bool = False,
        pos_weight: float = 1.0,
        mae_decoder_width: Optional[int] = None,
        mae_decoder_depth: Optional[int] = None,
        mae_decoder_heads: Optional[int] = None,
        timm_name: Optional[str] = None,
    ) -> None:
        super().__init__()
        img_hw = to_2tuple(img_size)
        if any(s % patch_size for s in img_hw):
            raise UserError(f"image size {img_hw} is not divisible by the patch size {patch_size}: pick a multiple")
        if mask_token not in MASK_TOKEN_TYPES:
            raise UserError(f"unknown mask token {mask_token!r}: use one of {', '.join(MASK_TOKEN_TYPES)}")
        if tau <= 0:
            raise UserError(f"attentive temperature tau must be > 0, got {tau}")
        # The MAE decoder is the position decoder's shape unless told otherwise (the published code's).
        mae_decoder_width = decoder_width if mae_decoder_width is None else mae_decoder_width
        mae_decoder_depth = decoder_depth if mae_decoder_depth is None else mae_decoder_depth
        mae_decoder_heads = decoder_heads if mae_decoder_heads is None else mae_decoder_heads
        for name, width, heads in (("decoder", decoder_width, decoder_heads),
                                   ("MAE decoder", mae_decoder_width, mae_decoder_heads),
                                   ("encoder", embed_dim, num_heads)):
            if width % heads:
                raise UserError(f"{name} width {width} is not divisible by its {heads} heads")
        if embed_dim % 4 or (aux_mae and mae_decoder_width % 4):
            raise UserError("embed dim and MAE decoder width must be divisible by 4 for the 2-D sin-cos PE")

        self.img_size = img_hw
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.mask_ratio = mask_ratio
        self.pos_mask_ratio = pos_mask_ratio
        self.mask_token_type = mask_token
        self.decoder_width, self.decoder_depth, self.decoder_heads = decoder_width, decoder_depth, decoder_heads
        self.attentive = attentive
        self.tau = tau
        self.aux_mae = aux_mae
        self.pos_weight = pos_weight
        self.mae_decoder_width, self.mae_decoder_depth = mae_decoder_width, mae_decoder_depth

        # ---- encoder (timm's layout) ----
        self.patch_embed = PatchEmbed(img_size=img_hw, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        if mask_token == "random-wrong" and self.num_patches < 2:
            raise UserError("the 'random-wrong' mask token needs at least 2 patches")
        self.num_visible, self.num_keep_pe = mask_counts(self.num_patches, mask_ratio, pos_mask_ratio)
        if self.num_visible == self.num_keep_pe:
            raise UserError(
                f"position mask ratio {pos_mask_ratio} drops no PE among {self.num_visible} visible patches: "
                "raise --pos-mask-ratio"
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (not learned) PE; the [CLS] PE is zeros as in MAE. Non-persistent: always recomputed.
        self.register_buffer("pos_embed", self._sincos_pe(embed_dim), persistent=False)
        if mask_token == "learnable":
            self.mask_pos_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.register_parameter("mask_pos_token", None)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=dpr[i], norm_layer=LayerNorm)
            for i in range(depth)
        ])
        self.norm = LayerNorm(embed_dim)

        # ---- position decoder: no PE, no tokens for removed patches, logits over all L cells ----
        self.pos_decoder_embed = nn.Linear(embed_dim, decoder_width)
        self.pos_decoder_blocks = nn.Sequential(*[
            Block(decoder_width, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)
        ])
        self.pos_decoder_norm = LayerNorm(decoder_width)
        self.pos_decoder_head = nn.Linear(decoder_width, self.num_patches)
        self.register_buffer("grid_sq_dist", grid_sq_distances(self.grid_size), persistent=False)

        # ---- optional MAE pixel decoder (PEs and mask tokens, as in MAE) ----
        if aux_mae:
            self.mae_decoder_embed = nn.Linear(embed_dim, mae_decoder_width)
            self.mae_mask_token = nn.Parameter(torch.zeros(1, 1, mae_decoder_width))
            self.register_buffer("mae_decoder_pos_embed", self._sincos_pe(mae_decoder_width), persistent=False)
            self.mae_decoder_blocks = nn.Sequential(*[
                Block(mae_decoder_width, mae_decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(mae_decoder_depth)
            ])
            self.mae_decoder_norm = LayerNorm(mae_decoder_width)
            self.mae_decoder_pred = nn.Linear(mae_decoder_width, patch_size * patch_size * in_chans)

        self.timm_name = timm_name or self._default_timm_name()
        self._init_weights()

    # ---- construction helpers ----

    def _sincos_pe(self, dim: int) -> torch.Tensor:
        """[1, 1 + L, dim] fixed 2-D sin-cos PE (timm's builder, row-major grid), zeros for [CLS]."""
        pe = build_sincos2d_pos_embed(list(self.grid_size), dim=dim)
        return torch.cat([torch.zeros(1, dim), pe], dim=0).unsqueeze(0)

    def _default_timm_name(self) -> str:
        for name, dims in MODELS.items():
            if dims == (self.embed_dim, self.depth, self.num_heads, self.patch_size):
                return f"{name}_224"
        return "vit_base_patch16_224"  # custom dims: the exported model_args carry the whole architecture

    def _init_weights(self) -> None:
        """MAE's initialisation (DropPos builds on MAE): xavier linears/patch conv, normal(0.02) tokens."""
        nn.init.normal_(self.cls_token, std=0.02)
        for token in (self.mask_pos_token, getattr(self, "mae_mask_token", None)):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Token / PE names excluded from weight decay (timm's convention; pos_embed is a fixed buffer)."""
        names = {"cls_token", "pos_embed", "mask_pos_token", "mae_mask_token"}
        params = dict(self.named_parameters())
        return {n for n in names if n in params} | {"pos_embed"}

    # ---- encoder ----

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, 1 + L, D] final-norm encoder output on the whole image with every PE (what timm computes)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self.blocks(x))

    def random_order(self, batch_size: int, device: torch.device, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L] one random permutation of patch indices per image (argsort of uniform noise).

        Its first K entries keep their PE, the next V - K have it dropped, the rest are removed.
        Pass `noise` [B, L] to fix the masks (tests, diagnostics).
        """
        if noise is None:
            noise = torch.rand(batch_size, self.num_patches, device=device)
        elif noise.shape != (batch_size, self.num_patches):
            raise ValueError(f"noise must be [{batch_size}, {self.num_patches}], got {list(noise.shape)}")
        return torch.argsort(noise, dim=1)

    def _dropped_pos_tokens(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, n, D] what replaces the PE of the n dropped patches at `positions` [B, n]."""
        batch, n = positions.shape
        if self.mask_token_type == "learnable":
            return self.mask_pos_token.expand(batch, n, -1)
        if self.mask_token_type == "zeros":
            return self.pos_embed.new_zeros(batch, n, self.embed_dim)
        if self.mask_token_type == "wrong":
            # The published variant: one permutation of the n dropped slots for the whole batch, each slot
            # taking the PE of the slot it is sent to (argsort of uniform noise: static shape, no host sync).
            shuffle = torch.argsort(torch.rand(n, device=positions.device))
            return self.pos_embed[0, 1:][positions[:, shuffle]]
        # "random-wrong": per patch, the PE of another cell, uniformly among the L - 1 wrong ones.
        offset = torch.randint(1, self.num_patches, (batch, n), device=positions.device)
        return self.pos_embed[0, 1:][(positions + offset) % self.num_patches]

    def encode_masked(self, imgs: torch.Tensor, order: torch.Tensor, num_visible: int, num_keep_pe: int) -> torch.Tensor:
        """[B, 1 + V, D] encoder output for the visible patches order[:, :V]; order[:, K:V] lose their PE."""
        x = self.patch_embed(imgs)
        batch, _, dim = x.shape
        visible = order[:, :num_visible]
        x = torch.gather(x, 1, visible.unsqueeze(-1).expand(-1, -1, dim))
        pe_kept = self.pos_embed[0, 1:][order[:, :num_keep_pe]]
        pe_dropped = self._dropped_pos_tokens(order[:, num_keep_pe:num_visible])
        x = x + torch.cat([pe_kept, pe_dropped.to(pe_kept.dtype)], dim=1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.norm(self.blocks(x))

    # ---- decoders ----

    def decode_positions(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, V, L] position logits (fp32) for the visible tokens of `latent` [B, 1 + V, D].

        The decoder also sees the [CLS] token (as MAE's and the published decoder do; docs/METHOD.md's 28.3 GFLOPs
        count it) but predicts positions for the V patch tokens only.
        """
        x = self.pos_decoder_blocks(self.pos_decoder_embed(latent))
        return self.pos_decoder_head(self.pos_decoder_norm(x[:, 1:])).float()

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L, p*p*C] pixels per patch, patches row-major like PatchEmbed."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def mae_loss(self, imgs: torch.Tensor, latent: torch.Tensor, order: torch.Tensor, num_visible: int) -> torch.Tensor:
        """MAE pixel loss on the removed patches, targets normalised per patch (norm_pix_loss)."""
        batch, num_patches = order.shape
        x = self.mae_decoder_embed(latent)
        width = x.shape[-1]
        tokens = torch.cat([x[:, 1:], self.mae_mask_token.to(x.dtype).expand(batch, num_patches - num_visible, -1)], 1)
        restore = torch.argsort(order, dim=1)
        tokens = torch.gather(tokens, 1, restore.unsqueeze(-1).expand(-1, -1, width))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.mae_decoder_pos_embed
        x = self.mae_decoder_norm(self.mae_decoder_blocks(x))[:, 1:]
        removed = order[:, num_visible:]
        pred = self.mae_decoder_pred(torch.gather(x, 1, removed.unsqueeze(-1).expand(-1, -1, width))).float()
        target = self.patchify(imgs.float())
        target = torch.gather(target, 1, removed.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        return (pred - target).pow(2).mean()

    # ---- the pretext ----

    def position_targets(self, sigma: Union[float, torch.Tensor]) -> torch.Tensor:
        """[L, L] smoothed targets on this model's grid."""
        return _smooth_targets(self.grid_sq_dist, sigma)

    def saliency(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, L] attentive weights (fp32) from a no-grad unmasked forward of the current encoder.

        It runs in the caller's precision: under the caller's autocast (bf16 means bf16), fp32 without one,
        on CPU and CUDA alike. no_grad rather than inference_mode: the weights multiply the loss, and
        inference tensors cannot be saved for backward; under torch.compile both cost the same. Call it
        separately and pass the result as `forward(..., saliency=...)` to run it as its own graph
        (`compile_step`), or let forward compute it inline. Drop path, if enabled, stays active here as in
        any train-mode forward (pre-training uses none).
        """
        with torch.no_grad():
            feats = self.forward_features(imgs)
        return attentive_weights(feats[:, 0], feats[:, 1:], self.tau)

    def forward_position(
        self,
        imgs: torch.Tensor,
        mask_ratio: Optional[float] = None,
        pos_mask_ratio: Optional[float] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Position logits at any (mask_ratio, pos_mask_ratio), e.g. (0, 1): all visible, every PE dropped.

        Returns 'logits' [B, V, L] (fp32), 'positions' [B, V] (true cell index) and 'dropped' [B, V] (bool).
        """
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        pos_mask_ratio = self.pos_mask_ratio if pos_mask_ratio is None else pos_mask_ratio
        num_visible, num_keep_pe = mask_counts(self.num_patches, mask_ratio, pos_mask_ratio)
        order = self.random_order(imgs.shape[0], imgs.device, noise)
        logits = self.decode_positions(self.encode_masked(imgs, order, num_visible, num_keep_pe))
        dropped = torch.arange(num_visible, device=imgs.device) >= num_keep_pe
        return {
            "logits": logits,
            "positions": order[:, :num_visible],
            "dropped": dropped.unsqueeze(0).expand(imgs.shape[0], -1),
        }

    def forward(
        self,
        imgs: torch.Tensor,
        sigma: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        saliency: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """One pre-training forward: loss and metrics as 0-dim tensors (no host sync, static shapes).

        `sigma` is a 0-dim tensor on the device (a Python float would recompile a compiled model whenever it
        changes). `saliency` [B, L]: this model's `saliency(imgs)`, computed by the caller (e.g. as its own
        compiled graph); None computes it here. Keys: 'loss', 'loss_pos', 'pos_acc' (top-1 over dropped
        patches), 'pos_acc_weighted' (attention-weighted; equal to 'pos_acc' without attentive
        reconstruction), and 'loss_mae' with aux_mae.
        """
        if saliency is not None:
            if not self.attentive:
                raise ValueError("saliency given to a model built without attentive reconstruction")
            if saliency.shape != (imgs.shape[0], self.num_patches):
                raise ValueError(f"saliency must be [{imgs.shape[0]}, {self.num_patches}], got {list(saliency.shape)}")
        num_visible, num_keep_pe = self.num_visible, self.num_keep_pe
        order = self.random_order(imgs.shape[0], imgs.device, noise)
        latent = self.encode_masked(imgs, order, num_visible, num_keep_pe)
        logits = self.decode_positions(latent)[:, num_keep_pe:]  # dropped patches only
        positions = order[:, num_keep_pe:num_visible]
        targets = self.position_targets(sigma)[positions]  # [B, V - K, L]
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), reduction="none").view_as(positions)

        if self.attentive:
            saliency = self.saliency(imgs) if saliency is None else saliency
            weights = saliency.gather(1, order[:, :num_visible])
            weights = (weights / weights.sum(dim=1, keepdim=True))[:, num_keep_pe:]
        else:
            weights = torch.ones_like(ce)
        weight_sum = weights.sum()
        loss_pos = (weights * ce).sum() / weight_sum
        correct = (logits.argmax(dim=-1) == positions).float()
        out = {
            "loss_pos": loss_pos,
            "pos_acc": correct.mean(),
            "pos_acc_weighted": (weights * correct).sum() / weight_sum,
        }
        loss = self.pos_weight * loss_pos
        if self.aux_mae:
            out["loss_mae"] = self.mae_loss(imgs, latent, order, num_visible)
            loss = loss + out["loss_mae"]
        out["loss"] = loss
        return out

    # ---- accounting ----

    def flops_per_image(self) -> dict[str, float]:
        """Matmul FLOPs per image (2 per multiply-add; norms, softmax and GELU not counted).

        'step': forward + backward of the masked training step = 3 x forward of the encoder over 1 + V tokens
        and of the decoders, plus 2 x the patch embedding over all L patches (its forward and weight gradient:
        the image needs no gradient). 'attentive': the no-grad forward over all 1 + L tokens.
        ViT-B/16 at 224 (V = 49, decoder 512 x 2): 28.3 and 35.1 GFLOPs, docs/METHOD.md's figures.
        """
        L, V, D, r = self.num_patches, self.num_visible, self.embed_dim, self.mlp_ratio
        patch_embed = 2.0 * L * self.in_chans * self.patch_size ** 2 * D
        encoder = self.depth * _block_flops(1 + V, D, r)
        w = self.decoder_width
        decoder = 2.0 * (1 + V) * D * w + self.decoder_depth * _block_flops(1 + V, w, r) + 2.0 * V * w * L
        if self.aux_mae:
            wm = self.mae_decoder_width
            decoder += (2.0 * (1 + V) * D * wm + self.mae_decoder_depth * _block_flops(1 + L, wm, r)
                        + 2.0 * (L - V) * wm * self.patch_size ** 2 * self.in_chans)
        return {
            "step": 3.0 * (encoder + decoder) + 2.0 * patch_embed,
            "attentive": patch_embed + self.depth * _block_flops(1 + L, D, r) if self.attentive else 0.0,
        }

    def timm_model_args(self) -> dict[str, Any]:
        """Arguments that make `timm.create_model(self.timm_name, **args)` the same encoder architecture."""
        return {
            "img_size": list(self.img_size),
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
        }


# ----------------------------------------------------------------------------------------------------------
# Compiled training step


def compile_step(
    model: nn.Module,
    device: Union[str, torch.device],
    mode: Optional[str] = None,
    saliency_mode: Optional[str] = "auto",
) -> tuple[Optional[Callable[[torch.Tensor], torch.Tensor]], Callable[..., dict[str, torch.Tensor]]]:
    """(saliency_fn, forward_fn): the attentive pass and the training step as two compiled graphs.

    `model` is what the step calls (the DropPosViT, DDP-wrapped or not). Call, under the run's autocast:
        weights = saliency_fn(imgs) if saliency_fn is not None else None
        out = forward_fn(imgs, sigma, saliency=weights)
    forward_fn is torch.compile(model, mode=mode), the training graph. saliency_fn is the model's no-grad
    `saliency` compiled on its own (fullgraph, static shapes): an inference graph with no backward, which on
    CUDA runs as a CUDA graph (`saliency_mode` 'auto': 'reduce-overhead' on CUDA, the default mode elsewhere),
    one replay instead of a launch per kernel. Its output is cloned out of the CUDA-graph pool ([B, L], a few
    KB) so that the next replay cannot overwrite weights the step still uses. saliency_fn is None for a model
    without attentive reconstruction.
    """
    core = droppos_core(model)
    forward_fn = torch.compile(model, mode=mode)
    if not core.attentive:
        return None, forward_fn
    if saliency_mode == "auto":
        saliency_mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    compiled = torch.compile(core.saliency, mode=saliency_mode, fullgraph=True, dynamic=False)
    if saliency_mode not in ("reduce-overhead", "max-autotune"):
        return compiled, forward_fn

    def saliency_fn(imgs: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(imgs).clone()

    return saliency_fn, forward_fn


# ----------------------------------------------------------------------------------------------------------
# Export


_ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")


def droppos_core(model: nn.Module) -> nn.Module:
    """The DropPosViT inside torch.compile and DDP wrappers."""
    from droppos.distributed import unwrap

    core = unwrap(model)
    if not isinstance(core, DropPosViT):
        raise TypeError(f"expected a DropPosViT (possibly wrapped), got {type(core).__name__}")
    return core


def encoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights in timm's `vit_*` key layout (of the DropPosViT inside any DDP/compile wrapper)."""
    core = droppos_core(model)
    state = {}
    for key, value in core.state_dict().items():
        if key == "cls_token" or key.startswith(_ENCODER_PREFIXES):
            state[key] = value.detach().float().cpu().contiguous().clone()
    state["pos_embed"] = core.pos_embed.detach().float().cpu().contiguous().clone()
    return state


def create_from_config(config: PretrainConfig) -> "DropPosViT":
    """The DropPos model a pretrain config describes: the options declared `model_arg` in droppos/recipes.py
    are its constructor arguments. One place for pretrain (which builds it) and the readers of its checkpoints
    (which rebuild it from the recorded config: `recipes.from_record`)."""
    import timm

    from droppos.recipes import model_args

    return timm.create_model(f"droppos_{config.model.arch}", img_size=config.model.img_size, **model_args(config))


# ----------------------------------------------------------------------------------------------------------
# timm registry


def _create(name: str, pretrained: bool = False, /, **kwargs: Any) -> DropPosViT:
    """Build a registered size (recipes.MODELS); any constructor argument (img_size, patch_size, dims,
    pretext) may override."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if pretrained:
        raise UserError("droppos models have no published weights: create them with pretrained=False")
    embed_dim, depth, num_heads, patch = MODELS[name]
    arch = dict(patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    arch.update(kwargs)
    arch.setdefault("timm_name", f"{name}_224")
    return DropPosViT(**arch)


@register_model
def droppos_vit_tiny_patch16(pretrained: bool = False, **kwargs: Any) -> DropPosViT:
    """DropPos ViT-Ti/16 (192 wide, 12 blocks, 3 heads)."""
    return _create("vit_tiny_patch16", pretrained, **kwargs)


@register_model
def droppos_vit_small_patch16(pretrained: bool = False, **kwargs: Any) -> DropPosViT:
    """DropPos ViT-S/16 (384, 12, 6)."""
    return _create("vit_small_patch16", pretrained, **kwargs)


@register_model
def droppos_vit_base_patch16(pretrained: bool = False, **kwargs: Any) -> DropPosViT:
    """DropPos ViT-B/16 (768, 12, 12): the paper's main model."""
    return _create("vit_base_patch16", pretrained, **kwargs)


@register_model
def droppos_vit_base_patch32(pretrained: bool = False, **kwargs: Any) -> DropPosViT:
    """DropPos ViT-B/32 (768, 12, 12)."""
    return _create("vit_base_patch32", pretrained, **kwargs)


@register_model
def droppos_vit_large_patch16(pretrained: bool = False, **kwargs: Any) -> DropPosViT:
    """DropPos ViT-L/16 (1024, 24, 16)."""
    return _create("vit_large_patch16", pretrained, **kwargs)


@register_model
def droppos_vit_huge_patch14(pretrained: bool = False, **kwargs: Any) -> DropPosViT:
    """DropPos ViT-H/14 (1280, 32, 16)."""
    return _create("vit_huge_patch14", pretrained, **kwargs)
