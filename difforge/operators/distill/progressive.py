"""`distill.progressive` (Salimans and Ho) and `distill.guided` (Meng et al.): a trained
diffusion model distilled into a student that samples in fewer steps, on the same DeepSpeed and
Ray Train machinery, checkpoints and resume as `train.diffusion`. The recipe is in _recipe.py.

Inputs: the teacher (a `train.diffusion` or `distill.*` step) and the data it was trained on;
optionally a `train.classifier` step and reference images, for a Fréchet distance per round.
The output is a model folder like `train.diffusion`'s: `sample.diffusion` and `difforge sample`
draw from it with its own step count (and, for a guided student, at any w in its range with
one network evaluation per step).
"""

from __future__ import annotations

import copy
import tempfile
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from difforge.diffusion.data import DEFAULT_SHUFFLE_MB, ShuffleMB
from difforge.diffusion.training import DeepSpeedConfig
from difforge.platform import columns as C
from difforge.platform.errors import DifforgeError
from difforge.platform.operator import Columns, JobOperator, JobResult
from difforge.platform.resources import Resources

if TYPE_CHECKING:
    from difforge.platform.context import JobContext


class Training(BaseModel):
    """What every distillation takes: the optimizer, checkpoints, data order, evaluation."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    checkpoint_every: int = Field(100, ge=1)
    seed: int = 0
    shuffle_mb: ShuffleMB = DEFAULT_SHUFFLE_MB
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    eval_images: int = Field(
        500,
        ge=10,
        description="samples per round for the Fréchet "
        "distance, when a classifier and reference images are inputs",
    )


class Common(Training):
    teacher_steps: int = Field(8, ge=2, description="DDIM steps of the teacher (a power of 2)")
    rounds: int = Field(
        2, ge=1, description="halvings: the student samples in teacher_steps / 2^rounds"
    )
    steps_per_round: int = Field(500, ge=1, description="optimizer steps per halving")

    @model_validator(mode="after")
    def _check(self):
        n = self.teacher_steps
        if n & (n - 1) or n >> self.rounds < 1:
            raise ValueError(
                f"teacher_steps {n} must be a power of 2 of at least 2^rounds ({2**self.rounds})"
            )
        return self


class ProgressiveParams(Common):
    guidance_scale: float | None = Field(
        None,
        description="distil the teacher's classifier-free guided output at this w into "
        "the student's one conditional pass (None: conditional only)",
    )


class GuidedParams(Common):
    w_min: float = Field(0.0, ge=0, description="the student learns every w in [w_min, w_max]")
    w_max: float = Field(4.0, ge=0)
    guide_steps: int = Field(500, ge=1, description="optimizer steps of stage one (w as an input)")


def ray_loop(config: dict[str, Any]) -> None:
    import ray.train

    from difforge.diffusion.training import RayTrainIO
    from difforge.operators.distill._recipe import distill

    ctx = ray.train.get_context()
    distill(
        config, ctx.get_world_rank(), ctx.get_world_size(), RayTrainIO(ctx.get_world_rank(), config)
    )


class _Distill(JobOperator):
    resources = Resources(num_workers=1, num_gpus="auto")
    gpus_when_available = 1.0
    inputs: ClassVar[tuple[int, int]] = (2, 4)  # teacher, data[, classifier, reference images]
    guided: ClassVar[bool] = False

    def columns(self) -> Columns:
        written = {C.ID, C.MODEL_URI, "kind", "final_loss", "steps", "num_inference_steps"}
        return Columns(reads={C.ID}, writes=written, keeps_input=False)

    def plan(self) -> list[dict[str, Any]]:
        p = self.params
        phases = []
        if self.guided:  # w is learnt on the teacher's own grid
            phases.append(
                {"kind": "guide", "steps": p.guide_steps, "sample_steps": p.teacher_steps}
            )
        for r in range(p.rounds):
            phases.append(
                {
                    "kind": "halve",
                    "teacher_steps": p.teacher_steps >> r,
                    "steps": p.steps_per_round,
                    "sample_steps": p.teacher_steps >> (r + 1),
                }
            )
        return phases

    def student_steps(self) -> int:
        """The steps the student samples in by default: its last phase's."""
        return self.plan()[-1]["sample_steps"]

    def check_teacher(self, info: dict) -> None:
        """Refuse a teacher this distillation cannot follow, before any worker starts."""
        if info.get("guidance_embedding"):
            raise DifforgeError(f"{self.name}: the teacher is a guided student already")
        if info.get("objective") == "flow_matching":
            raise DifforgeError(
                f"{self.name}: the teacher is a flow-matching model; progressive "
                "and guided distillation follow a DDIM (DDPM-trained) teacher's "
                "steps: distil an epsilon or v_prediction model"
            )
        if (
            info.get("guidance_scale") is not None
            and getattr(self.params, "guidance_scale", None) is not None
        ):
            raise DifforgeError(
                f"{self.name}: the teacher has guidance built in (w = "
                f"{info['guidance_scale']}): leave guidance_scale unset"
            )
        if self.guided and not info.get("num_classes"):
            raise DifforgeError(
                "distill.guided needs a class-conditional teacher (guidance "
                "mixes its conditional and unconditional outputs)"
            )
        if self.guided and not info["backbone"].startswith("UNet"):
            raise DifforgeError(f"distill.guided needs a UNet teacher, not {info['backbone']}")

    def run(self, ctx: JobContext) -> JobResult:
        import pyarrow as pa

        from difforge.diffusion.model_folder import model_info
        from difforge.diffusion.training import deepspeed_config
        from difforge.platform import raytrain as _raytrain

        teacher_ds, data = ctx.inputs[:2]
        evaluation = None
        if len(ctx.inputs) == 3:
            raise DifforgeError(
                f"{self.name}: an evaluation takes two more inputs, a "
                "train.classifier step and reference images"
            )
        if len(ctx.inputs) == 4:
            clf = ctx.inputs[2].to_arrow().to_pylist()[0]
            if clf.get("kind") != "classifier":
                raise DifforgeError(f"{self.name}: the third input must be a train.classifier step")
            evaluation = {
                "classifier_uri": clf[C.MODEL_URI],
                "images": self.params.eval_images,
                "reference_uri": ctx.inputs[3].uri,
            }
        row = teacher_ds.to_arrow().to_pylist()[0]
        if row.get("kind") != "diffusion" or not row.get(C.MODEL_URI):
            raise DifforgeError(
                f"{self.name}: the first input must be a train.diffusion or "
                "distill step (a diffusion model)"
            )
        info = model_info(row[C.MODEL_URI])
        self.check_teacher(info)
        column = info["column"]
        if column not in data.manifest.column_names:
            raise DifforgeError(
                f"{self.name}: the teacher was trained on `{column}`, which the "
                "second input lacks: give it the teacher's training data"
            )
        p = self.params.model_dump()
        deepspeed_config({**p, "grad_accum": 1}, 1, 1, ctx.resources.num_gpus > 0)
        config = {
            "params": p,
            "plan": self.plan(),
            "shards": data.shards(),
            "column": column,
            "teacher_uri": row[C.MODEL_URI],
            "guided": self.guided,
            "evaluation": evaluation,
            "use_gpu": ctx.resources.num_gpus > 0,
        }
        total = sum(phase["steps"] for phase in config["plan"])
        result = _raytrain.fit(ctx, ray_loop, config, progress=("loss", total, "steps"))
        steps = self.student_steps()
        model_uri, out_info = self.export(ctx, result.checkpoint, row[C.MODEL_URI], steps)
        table = pa.table(
            {
                C.ID: ["model"],
                C.MODEL_URI: [model_uri],
                "kind": ["diffusion"],
                "final_loss": [float(result.metrics["loss"])],
                "steps": pa.array([int(result.metrics["step"])], pa.int64()),
                "num_inference_steps": pa.array([steps], pa.int64()),
            }
        )
        return JobResult(table, metadata={"model": out_info})

    def export(self, ctx: JobContext, checkpoint, teacher_uri: str, steps: int):
        """The student as a model folder: weights, its sampler (DDIM with trailing spacing on
        the teacher's noise schedule, or a consistency student's LCM sampler), its step count,
        its guidance range or built-in guidance scale (its grid was logged by the
        training loop's last round)."""
        from difforge.diffusion.guided import GuidedStudent
        from difforge.diffusion.model_folder import ModelInfo, load_model, write_model_folder
        from difforge.diffusion.training import consolidated_state, import_deepspeed
        from difforge.operators.distill._recipe import student_scheduler

        import_deepspeed()
        base, info, sched_cfg, _ = load_model(teacher_uri, "ema")
        student = GuidedStudent(copy.deepcopy(base), info["backbone"]) if self.guided else base
        with checkpoint.as_directory() as d:
            student.load_state_dict(consolidated_state(d))
        p = self.params
        out = {
            **info,
            "num_inference_steps": steps,
            "distilled_from": teacher_uri,
            "distillation": {"method": self.name, **p.model_dump(mode="json")},
            "adapter": None,
            "parent_model": None,
            "parent_weights_sha256": None,
        }
        if self.guided:
            out["guidance_embedding"] = {"w_min": p.w_min, "w_max": p.w_max}
        elif getattr(p, "guidance_scale", None) is not None:
            out["guidance_scale"] = p.guidance_scale  # built in: sampled without CFG
        scheduler = student_scheduler(sched_cfg, self.plan())
        with tempfile.TemporaryDirectory() as d:
            unet = student.unet if self.guided else student
            extras = {"w_embedding": student.w_embedding.state_dict()} if self.guided else None
            write_model_folder(d, ModelInfo(**out), unet, scheduler, extras=extras)
            from difforge.diffusion.serving import register

            register(ctx, d, out, "distilled")
        return ctx.artifact("model"), out


class Progressive(_Distill):
    """Progressive distillation: N DDIM steps into N/2, repeated for `rounds` rounds."""

    name = "distill.progressive"
    # 2: the input is streamed, each example once per epoch; 3: extras saved as safetensors;
    # 4: a guidance_scale is applied by the first round's teacher only, and the student (which
    # has it built in, `guidance_scale` in its difforge.json) is sampled without CFG
    version = 4
    Params = ProgressiveParams


class Guided(_Distill):
    """Guided distillation: CFG (two passes at w) into one pass that takes w, then progressive."""

    name = "distill.guided"
    # 2: the input is streamed, each example once per epoch; 3: extras saved as safetensors
    version = 3
    Params = GuidedParams
    guided = True
