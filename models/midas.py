"""The MiDaS v3 DPT-Hybrid depth estimator of SD 2's depth model, inference only.

It is what the original builds as `ldm.modules.midas.api.MiDaSInference('dpt_hybrid')`: timm 0.4.12's
`vit_base_resnet50_384` (a ResNet-50 v2-style stem and three stages with weight-standardised convolutions
and 'SAME' padding, then ViT-B/16 over their 1/16 feature map) under `model.pretrained.model`, the DPT
reassemble layers under `model.pretrained.act_postprocess{3,4}` and the fusion blocks and head under
`model.scratch`. Module names mirror the official `depth_model.*` keys, so a checkpoint's weights load
with `strict=True` once that prefix is stripped.

Images are in [-1, 1] (AddMiDaS's `(x - 0.5) / 0.5`), [B, 3, H, W] with H and W multiples of 32; the
output is `MiDaSInference.forward`'s, [B, 1, H, W], relative inverse depth (larger = nearer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.layers import GroupNorm32, attention

VIT_WIDTH, VIT_DEPTH, VIT_HEADS, PATCH = 768, 12, 12, 16  # ViT-B/16
RESNET_LAYERS = (3, 4, 9)  # blocks per stage: a ResNet-50 cut after its third stage (stride 16)
HOOKS = (8, 11)  # the transformer blocks whose outputs feed the two coarsest DPT levels
FEATURES = 256  # DPT's fusion width


def _pad_same(x: torch.Tensor, k: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's 'SAME' padding (timm's `pad_same`): the output is ceil(size / stride), any odd pixel
    of padding goes right/bottom. Symmetric padding would shift every strided layer by a pixel."""
    pads = []
    for size in reversed(x.shape[-2:]):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class StdConv2dSame(nn.Conv2d):
    """timm's StdConv2dSame with the hybrid ViT's eps of 1e-8: each filter standardised to zero mean and
    unit (biased) variance before use, 'SAME' padded. Stride-1 convolutions pad statically, as timm does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        self.dynamic_pad = stride > 1
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding=0 if self.dynamic_pad else (kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = _pad_same(x, self.kernel_size[0], self.stride[0])
        # (w - mean) / sqrt(var + eps) over each filter, as timm's batch_norm over (1, out, -1) computes
        # it; layer_norm over the flattened filters is the same formula and several times faster on CPU.
        # In float32 whatever the weights' dtype: half-precision variances of 2304 small values lose digits.
        w = self.weight.float().flatten(1)
        w = F.layer_norm(w, w.shape[1:], eps=1e-8).reshape_as(self.weight)
        return F.conv2d(x, w.to(x.dtype), None, self.stride, self.padding)


class GroupNormAct(GroupNorm32):
    """timm's GroupNormAct: 32 groups, eps 1e-5, then ReLU unless it is the last norm of a residual branch."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x, inplace=True) if self.act else x


class Downsample(nn.Module):
    """The projection shortcut of a stage's first block (timm's DownsampleConv, not pre-activated)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride)
        self.norm = GroupNormAct(out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """timm's non-pre-activation `resnetv2.Bottleneck` (the one ViT hybrids use): the stride is on the 3x3."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        mid = out_channels // 4
        if in_channels != out_channels or stride != 1:
            self.downsample = Downsample(in_channels, out_channels, stride)
        self.conv1, self.norm1 = StdConv2dSame(in_channels, mid, 1), GroupNormAct(mid)
        self.conv2, self.norm2 = StdConv2dSame(mid, mid, 3, stride), GroupNormAct(mid)
        self.conv3, self.norm3 = StdConv2dSame(mid, out_channels, 1), GroupNormAct(out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if hasattr(self, "downsample") else x
        h = self.norm1(self.conv1(x))
        h = self.norm2(self.conv2(h))
        h = self.norm3(self.conv3(h))
        return F.relu(h.add_(shortcut), inplace=True)


class ResNetBackbone(nn.Module):
    """timm's `ResNetV2(layers=(3, 4, 9), preact=False, stem_type='same')` with no final norm or head.
    Returns every stage's output: DPT reads stages 0 and 1 (1/4 and 1/8), the ViT embeds stage 2 (1/16)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv, self.stem.norm = StdConv2dSame(3, 64, 7, stride=2), GroupNormAct(64)
        self.stages = nn.ModuleList()
        c_in = 64
        for i, depth in enumerate(RESNET_LAYERS):
            c_out, stride = 256 * 2 ** i, 1 if i == 0 else 2
            stage = nn.Module()
            stage.blocks = nn.Sequential(*(Bottleneck(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                                           for j in range(depth)))
            self.stages.append(stage)
            c_in = c_out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem.norm(self.stem.conv(x))
        # timm's MaxPool2dSame pads with -inf, so the padding never wins the max.
        x = F.max_pool2d(_pad_same(x, 3, 2, value=-math.inf), 3, 2)
        outs = []
        for stage in self.stages:
            x = stage.blocks(x)
            outs.append(x)
        return outs


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # timm's reshape(B, N, 3, heads, d): q, k, v are contiguous thirds
        return self.proj(attention(q, k, v, self.heads))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HybridViT(nn.Module):
    """timm's `vit_base_resnet50_384` as MiDaS runs it (`forward_flex`): the position embedding of its
    24x24 training grid resized to the input's grid, and the outputs of the hooked blocks taken raw."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, VIT_WIDTH))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + (384 // PATCH) ** 2, VIT_WIDTH))
        self.patch_embed = nn.Module()
        self.patch_embed.backbone = ResNetBackbone()
        self.patch_embed.proj = nn.Conv2d(1024, VIT_WIDTH, 1)  # timm's HybridEmbed: 1x1 "patches"
        self.blocks = nn.ModuleList(Block(VIT_WIDTH, VIT_HEADS) for _ in range(VIT_DEPTH))
        # The final norm and the ImageNet head are in the checkpoint but never reach the depth: DPT reads
        # the hooked blocks' outputs (MiDaS computes the norm and drops it; nothing computes the head).
        self.norm = nn.LayerNorm(VIT_WIDTH, eps=1e-6)
        self.head = nn.Linear(VIT_WIDTH, 1000)

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """MiDaS's `_resize_pos_embed`: the grid part bilinearly resized (align_corners False), the
        class token's embedding kept. At 384x384 the resize is the identity."""
        tok, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        side = int(math.sqrt(len(grid)))
        grid = rearrange(grid, "(h w) c -> 1 c h w", h=side)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear")
        return torch.cat([tok, rearrange(grid, "1 c h w -> 1 (h w) c")], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stage 0, stage 1 feature maps, tokens after blocks 8 and 11 (class token first)]."""
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        stage0, stage1, stage2 = self.patch_embed.backbone(x)
        tokens = rearrange(self.patch_embed.proj(stage2), "b c h w -> b (h w) c")
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = tokens + self.pos_embed_for(gh, gw)
        hooked = []
        for i, block in enumerate(self.blocks[:HOOKS[-1] + 1]):
            tokens = block(tokens)
            if i in HOOKS:
                hooked.append(tokens)
        return [stage0, stage1, *hooked]


class ProjectReadout(nn.Module):
    """DPT's 'project' readout: each patch token concatenated with the class token, projected back."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, 1:]
        return self.project(torch.cat([patches, x[:, :1].expand_as(patches)], dim=-1))


def _reassemble(*convs: nn.Module) -> nn.Sequential:
    """act_postprocess{3,4}: readout, then (indices 1, 2) the original's Transpose and a fixed 24x24
    Unflatten, which MiDaS skips in favour of the input's grid (done in `Encoder.forward`), then convs."""
    return nn.Sequential(ProjectReadout(VIT_WIDTH), nn.Identity(), nn.Identity(), *convs)


class Encoder(nn.Module):
    """MiDaS's `pretrained`: the hybrid ViT and the reassembly of its four outputs into feature maps at
    1/4, 1/8, 1/16 and 1/32. The ResNet stages are used as they are (act_postprocess1/2 are identities,
    without weights)."""

    def __init__(self):
        super().__init__()
        self.model = HybridViT()
        self.act_postprocess3 = _reassemble(nn.Conv2d(VIT_WIDTH, 768, 1))
        self.act_postprocess4 = _reassemble(nn.Conv2d(VIT_WIDTH, 768, 1),
                                            nn.Conv2d(768, 768, 3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        gh, gw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        layer_1, layer_2, tokens_3, tokens_4 = self.model(x)
        out = [layer_1, layer_2]
        for post, tokens in ((self.act_postprocess3, tokens_3), (self.act_postprocess4, tokens_4)):
            h = rearrange(post[0](tokens), "b (h w) c -> b c h w", h=gh, w=gw)
            out.append(post[3:](h))
        return out


class ResidualConvUnit(nn.Module):
    """MiDaS's ResidualConvUnit_custom without batch norm; its activation is a ReLU that is not in place,
    so the input it adds back is the un-rectified one."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """FeatureFusionBlock_custom (no deconv, bn or expand): add the skip's refined features, refine, upsample
    x2 bilinearly with align_corners=True, 1x1 conv. The coarsest block has no skip; its resConfUnit1
    is in the checkpoint all the same."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels, 1)
        self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)


def _head(features: int) -> nn.Sequential:
    """DPTDepthModel's head (non_negative=True): [4] is the last 1x1 conv; the ReLU after it is not in
    place here, so a forward hook on [4] sees the pre-ReLU values without cloning."""
    return nn.Sequential(
        nn.Conv2d(features, features // 2, 3, padding=1),
        Interpolate(2),
        nn.Conv2d(features // 2, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 1, 1),
        nn.ReLU(),
        nn.Identity(),
    )


class DPTDepthModel(nn.Module):
    """DPT with the 'vitb_rn50_384' backbone and 'project' readout: [B, 3, H, W] -> [B, H, W]."""

    def __init__(self):
        super().__init__()
        self.pretrained = Encoder()
        self.scratch = nn.Module()
        for i, c_in in enumerate((256, 512, 768, 768), start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(c_in, FEATURES, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FeatureFusionBlock(FEATURES))
        self.scratch.output_conv = _head(FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        l1, l2, l3, l4 = (conv(h) for conv, h in zip((s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn),
                                                     self.pretrained(x)))
        path = s.refinenet4(l4)
        path = s.refinenet3(path, l3)
        path = s.refinenet2(path, l2)
        path = s.refinenet1(path, l1)
        return s.output_conv(path).squeeze(1)


class MiDaSInference(nn.Module):
    """The checkpoint's `depth_model`: `model(images)` with images in [-1, 1], [B, 3, H, W], H and W
    multiples of 32 -> [B, 1, H, W], as the original `MiDaSInference.forward`."""

    def __init__(self):
        super().__init__()
        self.model = DPTDepthModel()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if images.ndim != 4 or images.shape[1] != 3 or h % 32 or w % 32:
            raise ValueError(f"the depth model takes [B, 3, H, W] images with H and W multiples of 32, "
                             f"got {list(images.shape)}")
        prediction = self.model(images)
        # The original resizes back to the input's size (bicubic, align_corners False): with H and W
        # multiples of 32 the sizes already agree and this is exactly the identity, kept for fidelity.
        return F.interpolate(prediction.unsqueeze(1), size=(h, w), mode="bicubic", align_corners=False)
