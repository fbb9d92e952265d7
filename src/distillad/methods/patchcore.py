"""PatchCore (Roth et al., CVPR 2022): the training-free reference method, in the distillation pipeline.

No student: the frozen teacher's mid-level features, locally aggregated, of every training image at every position
form a memory bank, thinned by greedy k-center coreset selection; a test position's anomaly value is its distance
to the nearest bank entry. "Training" is one pass over the training images (a fit stage, see
`methods.base.TrainingStage`); the bank is a buffer of the state_dict, so a run folder holds it like any weights.
The map goes through the shared scorer like every method's: upsampled, blurred (sigma 4), image score = max.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distillad.errors import ConfigError
from distillad.methods.base import (DistillationModel, FeaturePairs, FitContext, MethodOptions, TrainingStage,
                                    check_choice, register_method)
from distillad.methods.parts import local_average

# Bank rows per distance block: at batch 16 and 256 px (16384 query positions) a block is 16384 x 4096 floats,
# 256 MiB, whatever the bank's size. The loop over blocks is a fixed Python loop (the bank's size is fixed once
# trained), so tracing/export unrolls it.
BANK_CHUNK = 4096


@dataclass
class PatchCoreOptions(MethodOptions):
    levels: tuple[int, ...] = (2, 3)       # teacher taps; deeper ones are resized to the shallowest one's grid
    patch_size: int = 3                    # local aggregation: mean over a patch_size x patch_size neighbourhood
    # What a border patch averages over: zeros (the reference implementations' 3x3 average pooling with zero
    # padding counted, so border patches look alike and match border patches) | inside (only the pixels inside
    # the map). Measured on Magnetic Tile, benchmarks/RESULTS.md section 4.
    patch_padding: str = "zeros"
    feature_dim: int | None = None         # channel width after adaptive average pooling; None: keep all channels
    coreset_ratio: float = 0.1             # bank entries kept by the greedy k-center coreset (1: keep every patch)
    coreset_projection: int = 128          # random projection width for the coreset's distances (0: none)
    max_bank: int = 200_000                # cap on the patches gathered before the coreset; beyond it, each image
                                           # gives a seeded random subset of its positions. Bounds memory and the
                                           # coreset's time (~ coreset_ratio x max_bank^2 distances): 200k keeps
                                           # every patch of MVTec-sized sets at 256 px, ~5 min of one CPU core
    reweight: bool = False                 # the paper's image-score reweighting, applied by scaling each map
    reweight_neighbours: int = 9           # b: the bank neighbours of the nearest entry used by `reweight`

    # Runs saved before an option existed were built with these values (their banks depend on them).
    legacy_defaults: ClassVar[dict[str, Any]] = {"patch_padding": "inside"}

    def validate(self) -> None:
        super().validate()
        check_choice("patch_padding", self.patch_padding, ("zeros", "inside"))
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be an odd integer >= 1, got {self.patch_size}")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise ConfigError(f"feature_dim must be a positive integer or null, got {self.feature_dim}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.coreset_projection < 0:
            raise ConfigError(f"coreset_projection must be >= 0 (0: no projection), got {self.coreset_projection}")
        if self.max_bank < 1:
            raise ConfigError(f"max_bank must be a positive integer, got {self.max_bank}")
        if self.reweight_neighbours < 1:
            raise ConfigError(f"reweight_neighbours must be >= 1, got {self.reweight_neighbours}")


# ---------------------------------------------------------------------------------------------- building blocks


def channel_pooling_matrix(channels: int, dim: int) -> torch.Tensor:
    """(channels, dim) matrix whose product with a feature vector is `F.adaptive_avg_pool1d` over its channels
    (the same bins); a matmul exports anywhere, adaptive pooling with uneven bins does not."""
    matrix = torch.zeros(channels, dim)
    for i in range(dim):
        start, end = (i * channels) // dim, -((-(i + 1) * channels) // dim)
        matrix[start:end, i] = 1.0 / (end - start)
    return matrix


def squared_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q,D) x (K,D) -> (Q,K) squared Euclidean distances, as one matmul (plain ops: addmm, sum, clamp)."""
    keys_sq = (keys * keys).sum(1)
    queries_sq = (queries * queries).sum(1, keepdim=True)
    return torch.addmm(keys_sq.unsqueeze(0), queries, keys.t(), alpha=-2.0).add_(queries_sq).clamp_min_(0.0)


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, chunk: int = BANK_CHUNK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance of each query (Q,D) to its nearest bank row (M,D), and that row's index.

    The bank is searched in fixed blocks of `chunk` rows, so memory is Q x chunk whatever M is. The search uses
    the matmul form of squared distances, whose rounding is large next to a near-zero distance (|q|^2 - 2 q.b +
    |b|^2 cancels); the distance returned is recomputed directly from the nearest row, so it is exact."""
    best = best_index = None
    for start in range(0, bank.shape[0], chunk):
        value, index = squared_distances(queries, bank[start:start + chunk]).min(dim=1)
        if best is None:
            best, best_index = value, index
        else:
            closer = value < best
            best = torch.where(closer, value, best)
            best_index = torch.where(closer, index + start, best_index)
    return torch.linalg.vector_norm(queries - bank[best_index], dim=1), best_index


def image_weights(queries: torch.Tensor, distance: torch.Tensor, index: torch.Tensor, bank: torch.Tensor,
                  neighbours: int = 9) -> torch.Tensor:
    """PatchCore's image-score weight (paper, eq. 7), one per image (B,), from the images' patches (B,P,D), their
    nearest-bank distances (B,P) and indices (B,P).

    m_test is the image's most anomalous patch, m* its nearest bank entry, N_b(m*) the b = `neighbours` bank entries
    nearest to m* (m* included); w = 1 - exp(|m_test - m*|) / sum_{m in N_b(m*)} exp(|m_test - m|). Since m* is
    m_test's nearest entry, w lies in [1 - 1/b, 1): near 1 when m*'s neighbours are much farther from m_test (an
    isolated, rare normal patch), 1 - 1/b when they are as close as m* itself."""
    rows = torch.arange(queries.shape[0], device=queries.device)
    worst = distance.argmax(dim=1)
    test_patch = queries[rows, worst]                          # (B, D)
    score = distance[rows, worst]                              # (B,) = |m_test - m*|
    nearest_entry = bank[index[rows, worst]]                   # (B, D) = m*
    b = min(neighbours, bank.shape[0])
    to_bank = torch.cat([squared_distances(nearest_entry, bank[start:start + BANK_CHUNK])
                         for start in range(0, bank.shape[0], BANK_CHUNK)], dim=1)
    support = bank[to_bank.topk(b, dim=1, largest=False).indices]                       # (B, b, D)
    to_support = torch.linalg.vector_norm(support - test_patch.unsqueeze(1), dim=2)    # (B, b)
    return 1.0 - torch.exp(score - torch.logsumexp(to_support, dim=1))


def greedy_coreset(points: torch.Tensor, k: int, start: int = 0, progress: bool = False,
                   refresh: int = 64) -> tuple[torch.Tensor, float]:
    """Greedy k-center selection (Gonzalez): start at `start`, then repeatedly add the point farthest from the
    selected ones. Returns the selected indices, in selection order, and the coverage radius: the largest distance
    from any point to its nearest selected one. Stops early when every point is covered exactly (radius 0), so the
    selection holds no duplicates.

    The same picks as recomputing every distance at every step (up to float rounding), usually faster: each point
    remembers its nearest selected center and each center an upper bound on its cluster's radius r. By the triangle
    inequality a new center c can only come closer to a point x of center a's cluster if d(a, c) < 2 r(a), so only
    those clusters' points are visited (bounds tightened every `refresh` steps). Where that is more than a quarter
    of the points (early on, or on data spread evenly in feature space, where the bound prunes little), all
    distances are computed at once in the matmul form instead, which is cheaper than gathering most rows. Cost:
    up to k x n distances of the points' width.
    """
    n = points.shape[0]
    k = max(1, min(int(k), n))
    device = points.device
    selected = torch.empty(k, dtype=torch.long, device=device)
    centers = points.new_empty(k, points.shape[1])
    centers_sq = points.new_empty(k)                                        # |center|^2
    points_sq = (points * points).sum(1)                                    # |point|^2
    nearest = torch.linalg.vector_norm(points - points[start], dim=1)      # distance to the nearest center
    assign = torch.zeros(n, dtype=torch.long, device=device)               # which center that is
    radius = points.new_zeros(k)
    every = torch.empty_like(nearest)
    selected[0], centers[0], centers_sq[0], radius[0] = start, points[start], points_sq[start], nearest.max()
    count = 1
    bar = tqdm(total=k, disable=not progress, unit="center", dynamic_ncols=True, desc="coreset", miniters=256)
    bar.update(1)
    while count < k:
        index = int(nearest.argmax())
        if float(nearest[index]) <= 0.0:
            break
        center = points[index]
        center_sq = points_sq[index]
        # squared center-to-center distances in the matmul form (no count x D temporary); the pruning test gets a
        # margin well above that form's rounding, so it can only keep more clusters than needed, never fewer
        between_sq = torch.addmv(centers_sq[:count], centers[:count], center, alpha=-2.0).add_(center_sq)
        margin = (centers_sq[:count] + center_sq).mul_(1e-5)
        near = between_sq < radius[:count].square().mul_(4.0).add_(margin)
        candidates = near[assign].nonzero().squeeze(1)
        if 4 * candidates.numel() > n:
            torch.addmv(points_sq, points, center, alpha=-2.0, out=every)
            every.add_(center_sq).clamp_min_(0.0).sqrt_()
            every[index] = 0.0
            moved = (every < nearest).nonzero().squeeze(1)
            distance = every[moved]
        else:
            distance = torch.linalg.vector_norm(points.index_select(0, candidates).sub_(center), dim=1)
            closer = distance < nearest[candidates]
            moved, distance = candidates[closer], distance[closer]
        nearest[moved] = distance
        assign[moved] = count
        radius[count] = distance.max() if moved.numel() else 0.0
        selected[count], centers[count], centers_sq[count] = index, center, center_sq
        count += 1
        if count % refresh == 0:      # exact radii: the bounds only ever loosen as points move away
            radius[:count] = torch.zeros(count, dtype=radius.dtype, device=device).scatter_reduce(
                0, assign, nearest, reduce="amax")
        bar.update(1)
    bar.close()
    return selected[:count], float(nearest.max())


# ------------------------------------------------------------------------------------------------------- model


@register_method
class PatchCore(DistillationModel):
    name = "patchcore"
    # Nothing is optimised: the run's batch size only sets the feature pass; steps, epochs and the optimizer are
    # not used.
    recipe = {}
    options_class = PatchCoreOptions

    def __init__(self, backbone: str, options: PatchCoreOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__(backbone, options, pretrained=pretrained, weights=weights)
        self.levels = tuple(sorted(set(options.levels)))
        width = sum(self.spec.channels[level - 1] for level in self.levels)
        if options.feature_dim is not None and options.feature_dim > width:
            raise ConfigError(f"feature_dim {options.feature_dim} is wider than the {width} channels of levels "
                              f"{list(self.levels)}: choose at most {width}, or null for no pooling")
        self.feature_dim = options.feature_dim or width
        if self.feature_dim < width:
            self.register_buffer("channel_pool", channel_pooling_matrix(width, self.feature_dim), persistent=False)
        else:
            self.register_buffer("channel_pool", None, persistent=False)
        # The memory bank (entries, feature_dim): empty until fitted; `_load_from_state_dict` takes a saved
        # bank's size.
        self.register_buffer("bank", torch.zeros(0, self.feature_dim))

    # -- features -------------------------------------------------------------------------------------------
    def patch_features(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Locally aggregated teacher features at the shallowest chosen level's grid: (B,h,w,feature_dim)."""
        features = self.teacher_features(images, teacher)
        chosen = [local_average(features[level - 1], self.options.patch_size,
                                count_padding=self.options.patch_padding == "zeros") for level in self.levels]
        size = chosen[0].shape[-2:]
        chosen = chosen[:1] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in chosen[1:]]
        patches = torch.cat(chosen, dim=1).permute(0, 2, 3, 1)
        if self.channel_pool is not None:
            patches = patches @ self.channel_pool
        return patches

    def feature_pairs(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> FeaturePairs:
        raise NotImplementedError("patchcore has no student: it compares features with a memory bank "
                                  "(see discrepancy_maps)")

    # -- the map ----------------------------------------------------------------------------------------------
    def _search_bank(self) -> torch.Tensor:
        # Before fitting the bank is empty; the distance to a bank holding only the origin (the feature norm) keeps
        # an untrained model usable (shapes, speed of the feature path, BatchNorm folding checks).
        return self.bank if self.bank.shape[0] > 0 else self.bank.new_zeros(1, self.feature_dim)

    def discrepancy_maps(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """One "student", one "level": each position's distance to its nearest bank entry, (B,h,w)."""
        patches = self.patch_features(images)
        batch, height, width, dim = patches.shape
        queries = patches.reshape(-1, dim)
        bank = self._search_bank()
        distance, index = nearest_neighbours(queries, bank)
        maps = distance.view(batch, height, width)
        if self.options.reweight:
            weights = image_weights(queries.view(batch, height * width, dim), distance.view(batch, -1),
                                    index.view(batch, -1), bank, self.options.reweight_neighbours)
            maps = maps * weights.view(batch, 1, 1)
        return [[maps]]

    def training_loss(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        """No loss is trained; reported as one (the run's validation loss): the mean distance of the images' patches
        to their nearest bank entries."""
        patches = self.patch_features(images, teacher)
        distance, _ = nearest_neighbours(patches.reshape(-1, patches.shape[-1]), self._search_bank())
        return distance.mean()

    # -- "training": the memory bank ------------------------------------------------------------------------
    def training_stages(self) -> list[TrainingStage]:
        return [TrainingStage("memory_bank", fit=self.fit_bank)]

    def fit_bank(self, context: FitContext) -> dict[str, float]:
        """Gather every training patch (at most `max_bank`), select the coreset, keep it as the bank."""
        options = self.options
        generator = torch.Generator().manual_seed(context.seed)
        project = 0 < options.coreset_projection < self.feature_dim
        projection = (torch.randn(self.feature_dim, options.coreset_projection, generator=generator)
                      / math.sqrt(options.coreset_projection)).to(context.device) if project else None
        pool = projected = None
        filled = per_image = 0
        start = time.perf_counter()
        for images in context.batches:
            patches = self.patch_features(images)
            batch, height, width, dim = patches.shape
            patches = patches.reshape(batch, height * width, dim)
            if pool is None:
                positions = height * width
                per_image = min(positions, max(1, options.max_bank // max(1, context.n_images)))
                if per_image < positions:
                    context.log(f"  memory bank: {context.n_images} x {positions} patches exceed max_bank "
                                f"{options.max_bank}; keeping a random {per_image} per image")
                total = context.n_images * per_image
                pool = patches.new_empty(total, dim)
                projected = patches.new_empty(total, options.coreset_projection) if project else pool
            if per_image < height * width:
                keep = torch.stack([torch.randperm(height * width, generator=generator)[:per_image]
                                    for _ in range(batch)]).to(patches.device)
                patches = torch.gather(patches, 1, keep.unsqueeze(2).expand(-1, -1, dim))
            patches = patches.reshape(-1, dim)
            pool[filled:filled + patches.shape[0]] = patches
            if project:
                projected[filled:filled + patches.shape[0]] = patches @ projection
            filled += patches.shape[0]
        if pool is None or filled == 0:
            raise ConfigError("patchcore needs at least one training image to build its memory bank")
        pool, projected = pool[:filled], projected[:filled]
        features_seconds = time.perf_counter() - start
        size = filled if options.coreset_ratio >= 1.0 else max(1, math.ceil(options.coreset_ratio * filled))
        if size < filled:
            first = int(torch.randint(filled, (1,), generator=generator))
            selected, radius = greedy_coreset(projected, size, start=first, progress=context.progress)
            bank = pool[selected]
        else:
            bank, radius = pool, 0.0
        self.bank = bank.contiguous().clone()
        return {"train_loss": radius, "coreset_radius": radius, "patches": filled, "bank_size": self.bank.shape[0],
                "features_seconds": features_seconds,
                "coreset_seconds": time.perf_counter() - start - features_seconds}

    # -- loading ----------------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """The bank's size depends on the training data: take the saved one's (same width only; any other
        mismatch is left to the strict loader to report)."""
        saved = state_dict.get(prefix + "bank")
        if isinstance(saved, torch.Tensor) and saved.dim() == 2 and saved.shape[1] == self.bank.shape[1]:
            self.bank = torch.empty(saved.shape, dtype=self.bank.dtype, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
