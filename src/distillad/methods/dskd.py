"""DSKD (Yao & Gao 2024): dual-student knowledge distillation.

One frozen teacher, two students of the same scale with inverted structures:
- Se, a forward student with the teacher's architecture (image -> pyramid), randomly initialised;
- Sd, a decoder student that restores the pyramid deep-to-shallow from a deep-feature (DF) embedding.
The DF embedding is fed by Se's pyramid by default, so the decoder "hears" the encoder student (the paper's group
discussion) and its loss also trains Se. Both students are matched to the teacher on every pyramid level
(pyramid matching); their discrepancy maps are fused into one anomaly map.
The paper's body and code are not available: the open choices are switches (see DSKDOptions), settled by the
ablations in benchmarks/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from distillad.backbones import BACKBONE_NAMES, FeatureExtractor, backbone_spec, create_backbone
from distillad.errors import ConfigError
from distillad.methods.base import (
    DistillationModel,
    FeaturePairs,
    MethodOptions,
    TrainingStage,
    check_choice,
    check_foreground,
    register_method,
    select_levels,
)
from distillad.methods.parts import (
    cosine_distance_map,
    global_cosine_distance,
    hardest_share_mean,
    local_average,
    negative_similarity,
    reverse_student,
)


@dataclass
class DSKDOptions(MethodOptions):
    deepest_level: ClassVar[int] = 4      # levels may include 4 (stride 32): a four-level pyramid
    students: str = "both"            # both | encoder (Se alone, ~ vanilla S-T) | decoder (Sd alone, ~ RD)
    df_input: str = "student"         # what the DF embedding hears: student (Se) | teacher | both
    interaction_grad: bool = True     # let Sd's loss train Se through the DF embedding
    global_cosine: bool = False       # add RD's flattened-map cosine to the per-pixel loss
    bottleneck_blocks: int = 2
    # The students' target: the teacher's features averaged over k x k neighbourhoods (stride 1), 1 = raw. Local
    # aggregation is what makes the frozen features separate textured defects in a nearest-neighbour probe.
    teacher_pool: int = 1
    decoder_blocks: int = 2
    # the image score is the map's excess over its per-position maximum on the validation images; the map itself
    # is left as it is (benchmarks/RESULTS.md section 4: Magnetic Tile image AUROC +2.0 on 3/3 seeds, maps unchanged)
    position_norm: str = "score"
    # Denoising students: this share of training images gets a synthetic anomaly (AAND's generator) and the
    # students are asked for the teacher's features of the clean image there, so they learn to restore normal
    # features rather than to copy whatever they see. 0 = the paper's plain distillation.
    denoise: float = 0.0
    # Negative students: this share of training images gets a synthetic anomaly, and on its pixels the students are
    # trained away from the teacher's features of the altered image (loss: their cosine similarity there, floored at
    # 0) while the other pixels keep the usual loss. Plain distillation never tells a student what not to copy.
    # 0 = off (the paper).
    negative: float = 0.0
    # The weight of that term against the distillation loss. The term is a mean over the batch's anomalous pixels,
    # so the share above changes how many examples it sees, not how hard it pulls; this sets how hard.
    negative_weight: float = 1.0
    # Which students get the negative term (both | encoder | decoder); a student left out of it neither copies
    # nor is pushed off the anomalous pixels (they leave its loss), so it keeps the plain fit of normal images.
    negative_students: str = "both"
    # The share of each image's pixels, hardest first, that the loss averages on every student and level: 1 = all
    # (the paper's plain mean); below 1 the students spend training on the normal pixels they reproduce worst,
    # the ones that decide a defect-free image's score. 0.1: Magnetic Tile image AUROC +4.6 on 3/3 seeds at 256 px,
    # bottle level (benchmarks/RESULTS.md section 4, "The hardest pixels").
    hard_share: float = 0.1
    # How the forward student Se starts: scratch (random, the paper) or the ImageNet weights of another backbone
    # with the teacher's channels (a different network, so Se does not start as a copy of the teacher).
    encoder_init: str = "scratch"
    foreground: str = "auto"             # where the synthetic anomalies may go: auto | whole | mask
    foreground_mask: str | None = None   # mask image file for foreground=mask (white = object)
    texture_dir: str | None = None       # folder of texture images; None: built-in procedural textures
    # runs saved before hard_share existed were trained on the plain mean
    legacy_defaults: ClassVar[dict[str, Any]] = {"hard_share": 1.0}

    def validate(self) -> None:
        super().validate()
        check_choice("students", self.students, ("both", "encoder", "decoder"))
        for name in ("denoise", "negative"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1] (the share of training images given an anomaly), "
                                  f"got {getattr(self, name)}")
        if not self.negative_weight > 0.0:
            raise ConfigError(f"negative_weight must be > 0 (the weight of the negative term), "
                              f"got {self.negative_weight}")
        check_choice("negative_students", self.negative_students, ("both", "encoder", "decoder"))
        if self.negative_students not in ("both", self.students) and self.students != "both":
            raise ConfigError(f"negative_students={self.negative_students} names a student that "
                              f"students={self.students} does not train")
        if self.denoise > 0 and self.negative > 0:
            raise ConfigError("denoise and negative give the anomalous pixels opposite targets: set one of them")
        if not 0.0 < self.hard_share <= 1.0:
            raise ConfigError(f"hard_share must be in (0, 1] (the share of pixels the loss averages), "
                              f"got {self.hard_share}")
        check_choice("encoder_init", self.encoder_init, ("scratch", *BACKBONE_NAMES))
        if self.encoder_init != "scratch" and self.students == "decoder":
            raise ConfigError("encoder_init sets up the encoder student; students=decoder has none")
        check_foreground(self.foreground, self.foreground_mask)
        check_choice("df_input", self.df_input, ("student", "teacher", "both"))
        if self.teacher_pool < 1 or self.teacher_pool % 2 == 0:
            raise ConfigError(f"teacher_pool must be an odd number >= 1, got {self.teacher_pool}")
        if self.students == "decoder" and self.df_input != "teacher":
            raise ConfigError("students=decoder has no encoder student to feed the DF embedding: use df_input=teacher")


@register_method
class DSKD(DistillationModel):
    name = "dskd"
    # 360 steps, no epoch floor: `min_epochs=30` raised Magnetic Tile's image AUROC by 10 points at 128 px but not
    # at 256 px, for 3.6x the training time (benchmarks/RESULTS.md section 4); it stays a setting. With a fourth
    # level it does help at 256 px (86.4 against 78.0, 3 seeds), but that level lowers bottle's AUPRO on every seed.
    recipe = {"batch_size": 16,
              "optimizer": {"name": "adam", "lr": 0.002, "betas": (0.5, 0.999), "milestones": (0.8, 0.9)}}
    options_class = DSKDOptions

    def __init__(self, backbone: str, options: DSKDOptions, *, pretrained: bool = True,
                 weights: str | None = None) -> None:
        super().__init__(backbone, options, pretrained=pretrained, weights=weights)
        channels = self.teacher.channels
        self.use_encoder = options.students in ("both", "encoder")
        self.use_decoder = options.students in ("both", "decoder")
        if self.use_encoder:
            self.encoder_student = self._encoder_student(backbone, options, pretrained=pretrained)
        if self.use_decoder:
            embed_channels = [2 * c for c in channels] if options.df_input == "both" else list(channels)
            self.embedding, self.decoder_student = reverse_student(
                embed_channels, channels, bottleneck_blocks=options.bottleneck_blocks,
                decoder_blocks=options.decoder_blocks, relu_output=self.teacher_relu_features)
        self.anomalies = None
        if options.denoise > 0 or options.negative > 0:
            # built now, so that a bad texture folder or mask fails before any training
            from distillad.data.anomalies import AnomalyGenerator, StageAnomalies

            self.anomalies = StageAnomalies(AnomalyGenerator(
                None, texture_dir=options.texture_dir, probability=max(options.denoise, options.negative),
                foreground=options.foreground,
                foreground_mask=options.foreground_mask))

    def _encoder_student(self, backbone: str, options: DSKDOptions, *, pretrained: bool) -> FeatureExtractor:
        """Se: the teacher's structure, randomly initialised, or another backbone's ImageNet weights. A checkpoint
        being loaded (pretrained=False) gets the structure only: its state_dict holds the trained weights."""
        if options.encoder_init == "scratch":
            return create_backbone(backbone, levels=options.pyramid_levels(), pretrained=False)
        levels = options.pyramid_levels()
        channels = list(backbone_spec(options.encoder_init).channels[:max(levels)])
        if channels != list(self.teacher.channels):
            raise ConfigError(f"encoder_init {options.encoder_init!r} has channels {channels}, the teacher "
                              f"{backbone!r} {list(self.teacher.channels)}: Se must match the teacher's channels")
        return create_backbone(options.encoder_init, levels=levels, pretrained=pretrained)

    def feature_pairs(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> FeaturePairs:
        teacher = self.teacher_features(images, teacher)
        if self.options.teacher_pool > 1:
            teacher = [local_average(t, self.options.teacher_pool) for t in teacher]
        students: list[list[torch.Tensor]] = []
        encoder: list[torch.Tensor] = []
        if self.use_encoder:
            encoder = self.encoder_student(self.normalize(images))
            students.append(encoder)
        if self.use_decoder:
            heard = encoder if self.options.interaction_grad else [f.detach() for f in encoder]
            if self.options.df_input == "student":
                df_in = heard
            elif self.options.df_input == "teacher":
                df_in = teacher
            else:
                df_in = [torch.cat([t, e], dim=1) for t, e in zip(teacher, heard)]
            students.append(self.decoder_student(self.embedding(df_in)))
        return [select_levels(list(zip(teacher, s)), self.options.levels) for s in students]

    def training_loss(self, images: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        """With `denoise`, training batches get synthetic anomalies while the teacher's targets stay those of the
        clean images; with `negative`, the targets are the teacher's features of the altered images and the
        anomalous pixels are pushed away from them. In eval mode (the held-out loss on defect-free images) the
        images stay as they are."""
        if self.anomalies is None or not self.training:
            return self.loss(self.feature_pairs(images, teacher))
        teacher = self.teacher_features(images, teacher)
        if self.options.negative > 0:
            synthetic = self.anomalies(images)
            altered = synthetic.applied.nonzero().squeeze(1).to(images.device)
            if len(altered):   # the teacher sees what the students see; unaltered images keep their (cached) features
                features = self.teacher_features(synthetic.images[altered])
                teacher = [t.index_copy(0, altered, f.to(t.dtype)) for t, f in zip(teacher, features)]
            return self.loss(self.feature_pairs(synthetic.images, teacher), anomaly_masks=synthetic.masks)
        return self.loss(self.feature_pairs(self.anomalies(images).images, teacher))

    def training_stages(self) -> list[TrainingStage]:
        if self.anomalies is None:
            return super().training_stages()
        return [TrainingStage("distill", self.trainable_parameters, self.training_loss, state=self.anomalies.state,
                              load_state=self.anomalies.load_state)]

    def pushed_students(self) -> list[bool]:
        """For each student of `feature_pairs` (Se first), whether the negative term applies to it."""
        used = [name for name, on in (("encoder", self.use_encoder), ("decoder", self.use_decoder)) if on]
        return [self.options.negative_students in ("both", name) for name in used]

    def loss(self, pairs: FeaturePairs, anomaly_masks: torch.Tensor | None = None) -> torch.Tensor:
        """The distillation loss; with `anomaly_masks` (B,1,H,W) the masked pixels leave it, and the students named by
        `negative_students` get the negative term there instead."""
        total = torch.zeros((), device=pairs[0][0][0].device)
        resized: dict[tuple[int, ...], torch.Tensor] = {}   # the mask at each level's size, shared by the students
        pushed = self.pushed_students() if anomaly_masks is not None else [False] * len(pairs)
        for push, student in zip(pushed, pairs, strict=True):
            for t, s in student:
                distance = cosine_distance_map(t, s)
                if anomaly_masks is not None:
                    size = tuple(distance.shape[-2:])
                    if size not in resized:
                        resized[size] = F.interpolate(anomaly_masks, size=size, mode="area")[:, 0]
                    anomalous = resized[size]
                    if push:
                        total = total + self.options.negative_weight * negative_similarity(distance, anomalous)
                    distance = distance * (anomalous == 0)
                total = total + hardest_share_mean(distance, self.options.hard_share).mean()
                if self.options.global_cosine:
                    total = total + global_cosine_distance(t, s).mean()
        return total
