"""The understanding branch: SigLIP2's attention-pooling (MAP) head, the two semantic losses, and
the frozen SigLIP2 text tower.

    encoder tokens [N, width] --MAPHead, per packed sample--> embedding [B, width] (L2-normalised)

    images:       distill_loss(student, frozen SigLIP2 image embedding, text embeddings)   (KL, T = 2)
    video and 3D: sigmoid_loss(embedding, caption embedding, logit_scale, logit_bias)

Both losses take the data-parallel process group (``group``): their texts (the negatives) are
all-gathered over it, so a micro-batch is scored against the whole data-parallel micro-batch of its
stream, as SigLIP does over its global batch.

Logit scale convention (read in the installed HF ``Siglip2Model.forward``: ``logits *
logit_scale.exp() + logit_bias``, and tested against its loss): the learned parameter is the LOG
of the scale t, so the 4.8438 of docs/design.md (Model) is log t (t = exp(4.8438) ~ 127, the size
trained SigLIP models reach; training from scratch would start at log 10) and -15.5625 is the bias
b. Read as a plain scale, 4.8438 with b = -15.5625 would make every logit negative (|cos| <= 1): no
pair could ever be scored positive.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import TransformerConfig
from .hf_checkpoint import read_safetensors
from .transformer import MLP

LOGIT_SCALE_INIT = 4.8438  # log t
LOGIT_BIAS_INIT = -15.5625


class MAPHead(nn.Module):
    """Multihead attention pooling (SigLIP's ``MAPHead`` / HF ``Siglip2MultiheadAttentionPoolingHead``).

    A learned probe attends, per sample, over that sample's tokens of the packed stream; the result
    goes through ``x + MLP(LayerNorm(x))``. Parameters: ``probe`` [width], ``q`` and ``kv`` (HF's
    ``in_proj`` split into its q rows and its k, v rows), ``out`` (``out_proj``), ``norm``, ``mlp``.
    """

    NO_DECAY = ("probe",)  # a learned token, not a matrix (optimizer groups: model/params.py)

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        w = cfg.width
        self.probe = nn.Parameter(torch.zeros(w))
        self.q = nn.Linear(w, w)
        self.kv = nn.Linear(w, 2 * w)  # output rows [k (heads, head_dim); v (heads, head_dim)]
        self.out = nn.Linear(w, w)
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)  # the head is replicated, never tensor-parallel
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The probe as SigLIP2 initialises it (xavier over HF's [1, 1, width] shape); the linears and
        the norm keep their own (``AToken.reset_parameters`` re-initialises those)."""
        nn.init.xavier_uniform_(self.probe.view(1, 1, -1))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, width] packed tokens, cu_seqlens [B + 1] -> (embedding [B, width] L2-normalised,
        pooled [B, width] before normalisation, as HF's ``pooler_output``). Every sample needs a token."""
        n, h, d = x.shape[0], self.heads, self.head_dim
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        b = lens.shape[0]
        ids = torch.repeat_interleave(torch.arange(b, device=x.device), lens.to(x.device), output_size=n)  # [N]
        q = self.q(self.probe).view(h, d).float() * d ** -0.5  # the probe's query, the same for all samples
        k, v = self.kv(x).view(n, 2, h, d).float().unbind(1)  # each [N, h, d]
        scores = (k * q).sum(-1)  # [N, h]
        # Softmax over each sample's tokens, as segment operations on the packed stream.
        idx = ids[:, None].expand(n, h)
        peak = scores.new_full((b, h), -torch.inf).scatter_reduce(0, idx, scores, "amax")  # [B, h]
        w = (scores - peak[ids]).exp()
        w = w / w.new_zeros(b, h).index_add(0, ids, w)[ids]  # [N, h]
        pooled = v.new_zeros(b, h, d).index_add(0, ids, w[..., None] * v).flatten(1)  # [B, width] fp32
        pooled = self.out(pooled.to(x.dtype))
        pooled = pooled + self.mlp(self.norm(pooled))
        return F.normalize(pooled.float(), dim=-1), pooled


class Understanding(nn.Module):
    """``AToken.understanding``: the MAP head and the sigmoid loss' learnable log-scale and bias.

    ``forward`` returns the scale and bias as outputs (copies that keep the autograd path to the
    parameters): under ZeRO-3 a parameter holds its data only inside its module's forward, so the
    loss must never read ``logit_scale`` / ``logit_bias`` from the module afterwards.
    """
    NO_DECAY = ("logit_scale", "logit_bias")  # optimizer groups (model/params.py)

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.head = MAPHead(cfg)
        self.logit_scale = nn.Parameter(torch.tensor([LOGIT_SCALE_INIT]))  # [1], log t
        self.logit_bias = nn.Parameter(torch.tensor([LOGIT_BIAS_INIT]))  # [1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.head.reset_parameters()
        self.logit_scale.fill_(LOGIT_SCALE_INIT)
        self.logit_bias.fill_(LOGIT_BIAS_INIT)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, width], cu_seqlens [B + 1] -> (embedding [B, width] L2-normalised, pooled [B, width],
        logit_scale [1] (log t), logit_bias [1])."""
        emb, pooled = self.head(x, cu_seqlens)
        return emb, pooled, self.logit_scale.clone(), self.logit_bias.clone()


class _GatherRows(torch.autograd.Function):
    """All-gather of [b_r, D] rows over ``group`` (``sizes``: every rank's b_r) -> [sum b_r, D] in
    rank order; backward sums every rank's gradient of the gathered rows and keeps this rank's own
    (all-reduce, then slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
        peak = max(sizes)
        padded = x.new_zeros(peak, *x.shape[1:])  # all_gather needs equal shapes
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        ctx.group, ctx.sizes, ctx.rank, ctx.peak = group, sizes, dist.get_rank(group), peak
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes = ctx.sizes
        padded = grad.new_zeros(len(sizes), ctx.peak, *grad.shape[1:])  # [world, peak, D]
        for r, part in enumerate(grad.split(sizes)):
            padded[r, :sizes[r]] = part
        dist.all_reduce(padded, group=ctx.group)
        return padded[ctx.rank, :sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, group=None) -> tuple[torch.Tensor, list[int]]:
    """x [b, D] -> (every data-parallel rank's rows [B, D] in rank order, the per-rank counts b_r).
    Gradients reach each rank's own rows (the sum of every rank's gradient of them). ``group`` None
    (or a group of one): x itself."""
    sizes = row_counts(x.shape[0], group, x.device)
    if len(sizes) == 1:
        return x, sizes
    return _GatherRows.apply(x.contiguous(), group, sizes), sizes


def row_counts(n: int, group=None, device=None) -> list[int]:
    """Every rank's n over ``group``, in rank order ([n] without a group)."""
    if group is None or dist.get_world_size(group) == 1:
        return [n]
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([n], device=device), group=group)
    return [int(c) for c in counts]


def _global_scale(sizes: list[int]) -> float:
    """dp / B (B = sum of the ranks' rows): what a rank's sum over its own rows is multiplied by so
    that the data-parallel mean of the ranks' losses (and of their gradients, as DeepSpeed averages
    them) is the mean over all B rows."""
    return len(sizes) / sum(sizes)


def sigmoid_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, group=None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over a batch of matching pairs (row i of each is one pair).

    img_emb, txt_emb [b, D], L2-normalised; logits = exp(logit_scale) * img @ txt.T + logit_bias;
    label +1 for a matching pair, -1 otherwise; -sum(log sigmoid(label * logits)) / B, as big_vision
    and HF ``Siglip2Model(return_loss=True)``. In fp32.

    ``group``: the data-parallel process group. Each rank's images are scored against the texts of
    every rank (all-gathered, gradients back to each rank's own), one rank's chunk at a time, so a
    rank holds [b, b_r] logits, never [B, B] (SigLIP's chunked loss). The rank returns its rows' sum
    times dp / B: the mean over the group's ranks is the loss over all B pairs, and so are the
    DeepSpeed-averaged gradients. Collective: every rank of the group calls it. The ranks of a
    tensor-parallel group hold the same samples and pass the same data-parallel group: they agree.
    """
    if img_emb.shape != txt_emb.shape or img_emb.ndim != 2:
        raise ValueError(f"sigmoid_loss needs two [B, D] embeddings, got {tuple(img_emb.shape)} and "
                         f"{tuple(txt_emb.shape)}")
    img, scale, bias = img_emb.float(), logit_scale.float().exp(), logit_bias.float()
    txt, sizes = gather_rows(txt_emb.float(), group)  # [B, D]: row i of rank r's chunk pairs with its image i
    rank = dist.get_rank(group) if len(sizes) > 1 else 0
    total = img.new_zeros(())
    for r, chunk in enumerate(txt.split(sizes)):
        logits = scale * img @ chunk.t() + bias  # [b, b_r]
        labels = -torch.ones_like(logits)
        if r == rank:
            labels = labels + 2 * torch.eye(logits.shape[0], device=logits.device)
        total = total - F.logsigmoid(labels * logits).sum()
    return total * _global_scale(sizes)


def distill_loss(student_img: torch.Tensor, teacher_img: torch.Tensor, txt: torch.Tensor, scale: float | torch.Tensor,
                 temperature: float = 2.0, group=None) -> torch.Tensor:
    """KL(teacher || student) of image-to-text similarity distributions, averaged over images.

    student_img, teacher_img [b, D] and txt [k, D] L2-normalised (the teacher's text tower embeds
    both sides' texts, e.g. class prompts or the batch's captions); p = softmax_K(scale * img @
    txt.T / temperature). ``scale`` is the teacher's logit scale t = exp(log t), a constant: the
    student is pulled to the teacher's distribution as the teacher itself scores it.
    ``group``: the data-parallel process group: every image is scored against the texts of all
    ranks (all-gathered, K = sum k_r; gradients back to each rank's own), and the rank returns its
    images' sum times dp / B (as ``sigmoid_loss``): the group's mean is the mean over all B images.
    A rank holds [b, K] logits (a softmax needs the whole row). Collective.
    NOTE: multiplied by temperature**2 (Hinton et al. 2015) so the gradient's size does not shrink
    as 1/T**2 when the temperature changes; at T = 2 this is 4x the plain KL. In fp32.
    """
    if student_img.shape != teacher_img.shape or student_img.ndim != 2 or txt.ndim != 2 \
            or txt.shape[1] != student_img.shape[1]:
        raise ValueError(f"distill_loss needs student, teacher [B, D] and texts [K, D], got "
                         f"{tuple(student_img.shape)}, {tuple(teacher_img.shape)}, {tuple(txt.shape)}")
    txt = gather_rows(txt.float(), group)[0]  # [K, D]
    images = row_counts(student_img.shape[0], group, student_img.device)
    s = F.log_softmax(scale * student_img.float() @ txt.t() / temperature, dim=-1)  # [b, K]
    with torch.no_grad():
        t = F.log_softmax(scale * teacher_img.float() @ txt.t() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum")
    return kl * _global_scale(images) * temperature ** 2


class TextTower(nn.Module):
    """The frozen SigLIP2 text tower, loaded from a LOCAL directory (never downloaded).

    The directory is a HF ``save_pretrained`` of ``Siglip2TextModel`` or of a whole ``Siglip2Model``
    (only its text weights are read, plus its trained ``logit_scale`` / ``logit_bias`` when present:
    ``exp(logit_scale)`` is the teacher's scale for ``distill_loss``). Its tokenizer is loaded when
    the directory has one; texts are padded to ``max_length`` (SigLIP trained with
    padding="max_length", 64 tokens).
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_length: int = 64,
                 logit_scale: float | None = None, logit_bias: float | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.logit_scale, self.logit_bias = logit_scale, logit_bias  # log t and b, or None (text-only dir)

    @classmethod
    def from_pretrained(cls, path: str | Path, max_length: int = 64) -> TextTower:
        from transformers import AutoTokenizer, Siglip2TextModel  # noqa: PLC0415 - transformers takes seconds to import: the understanding branch only
        from transformers.utils import CONFIG_NAME  # noqa: PLC0415 - likewise; Hugging Face's config.json

        path = Path(path)
        if not (path / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{path}/{CONFIG_NAME} not found: pass a local SigLIP2 checkpoint directory "
                                    "(save_pretrained of Siglip2Model or Siglip2TextModel)")
        model = Siglip2TextModel.from_pretrained(path, local_files_only=True)
        tokenizer = None
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        logits = read_safetensors(path, "logit_")
        scale, bias = (float(logits[k]) if k in logits else None for k in ("logit_scale", "logit_bias"))
        return cls(model, tokenizer, max_length, scale, bias)

    @property
    def width(self) -> int:
        return self.model.config.projection_size

    @torch.no_grad()
    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [K, L] -> [K, projection_size] fp32, L2-normalised (HF ``text_embeds``)."""
        device = next(self.model.parameters()).device
        pooled = self.model(input_ids=input_ids.to(device)).pooler_output
        return F.normalize(pooled.float(), dim=-1)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """texts -> [K, projection_size] fp32, L2-normalised."""
        if self.tokenizer is None:
            raise ValueError("this text tower was loaded without a tokenizer: use embed_ids, or add the "
                             "tokenizer files to its directory")
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").input_ids
        return self.embed_ids(ids)

    def train(self, mode: bool = True) -> TextTower:
        return super().train(False)  # frozen: stays in eval mode

