"""The built-in operators, registered explicitly in this one list (plugins use the
`difforge.operators` entry-point group). Grouped by stage, one operator per file."""

from __future__ import annotations

from difforge.operators.corrupt.captions import Captions
from difforge.operators.corrupt.labels import Labels
from difforge.operators.curate.dedup_exact import DedupExact
from difforge.operators.curate.dedup_near import DedupNear
from difforge.operators.curate.filter import Filter
from difforge.operators.curate.validate import Validate
from difforge.operators.distill.progressive import Guided, Progressive
from difforge.operators.encode.text import EncodeText
from difforge.operators.encode.vae import EncodeVAE
from difforge.operators.evaluate.fid import FID
from difforge.operators.evaluate.memorization import Memorization
from difforge.operators.image.resize import Resize
from difforge.operators.ingest.digits import Digits
from difforge.operators.ingest.fashion_mnist import FashionMnist
from difforge.operators.ingest.images import Images
from difforge.operators.ingest.parquet import Parquet
from difforge.operators.ingest.webdataset import WebDataset
from difforge.operators.sample.diffusion import SampleDiffusion
from difforge.operators.sample.plan import SamplePlan
from difforge.operators.train.classifier import Classifier
from difforge.operators.train.diffusion import DiffusionTraining
from difforge.operators.train.vae import TrainVAE

BUILTIN = [
    FashionMnist,
    Digits,
    Images,
    Parquet,
    WebDataset,
    Validate,
    Filter,
    DedupExact,
    DedupNear,
    Labels,
    Captions,
    Resize,
    EncodeVAE,
    EncodeText,
    Classifier,
    TrainVAE,
    DiffusionTraining,
    Progressive,
    Guided,
    SamplePlan,
    SampleDiffusion,
    FID,
    Memorization,
]
