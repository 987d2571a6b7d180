"""Metric file names and keys written by each stage (read by ``dvc metrics show``)."""

from __future__ import annotations

PREPARE = "prepare.json"
TEACHER = "teacher.json"
EMBED = "embed.json"

# prepare.json
NUM_TRAIN = "num_train"
NUM_VAL = "num_val"
NUM_CLASSES = "num_classes"
SKIPPED_TRAIN = "skipped_train"
SKIPPED_VAL = "skipped_val"

# teacher.json
VAL_TOP1 = "val_top1"
TRAIN_TOP1 = "train_top1"
EPOCHS = "epochs"

# embed.json
TEACHER_FORWARDS = "teacher_forwards"
VIEWS = "views"
VIEW0_TOP1 = "view0_top1"  # per split: top-1 of the cached view-0 logits
BYTES_PER_SAMPLE_VIEW = "bytes_per_sample_view"
COMPRESSION_RATIO = "compression_ratio"
CLASSIFIER_REPRODUCES_LOGITS = "classifier_reproduces_logits"

# teacher training curve (DVC plot)
TEACHER_CURVE = "teacher_curve.csv"

# rdm.json: one entry per RDM, keyed "rdm_<i>"
RDM = "rdm.json"
RDM_RATE_WEIGHT = "rate_weight"
RDM_RATE_BITS = "rate_bits"
RDM_DISTORTION = "distortion"
RDM_VAL_TOP1 = "val_top1"
RDM_AGREEMENT = "teacher_agreement"
RDM_CURVE = "rdm_curve.csv"
RDM_PLOT = "rdm_rate_accuracy.png"

# distill/<method>.json: the student's final val figures and the stage's wall time
DISTILL_DIR = "distill"
SECONDS = "seconds"  # wall time of the whole stage, cache loading to saved student
DEVICE = "device"
WORLD = "world_size"
THREADS = "torch_threads"
# and TEACHER_FORWARDS: the teacher forwards behind the targets it learned from (rows × views drawn)

# evaluate.json: one entry per method plus "teacher"
EVALUATE = "evaluate.json"
EVAL_TOP1 = "val_top1"
EVAL_AGREEMENT = "teacher_agreement"
EVAL_KL = "kl_teacher_student"
EVAL_SECONDS = "distill_seconds"  # copied from distill/<method>.json when present
EVAL_TEACHER_FORWARDS = "teacher_forwards"  # likewise
EVAL_PLOT = "distill_accuracy.png"
