#!/usr/bin/env bash
# The CIFAR-10 study as DVC experiments. Every experiment is presets/cifar10.yaml plus the
# -S overrides named here, so a piece can be rerun alone and pieces can run in two clones
# that share one DVC cache (`dvc cache dir`). Run from the repository root, with ../shared
# (the JPEG CIFAR-10 and the ResNet-56) beside the repository.
#
#   studies/cifar10.sh base                # prepare, fine-tune the teacher, embed, RDMs
#   studies/cifar10.sh main [SEEDS...]     # CE, KD, DGKD, CIFD per seed (default 0 1 2)
#   studies/cifar10.sh ablations [SEEDS...] # 1 and 5 RDMs, CIFD without the IBM
#   studies/cifar10.sh rdm1|rdm5|noibm [SEEDS...] # one of those ablations
#   studies/cifar10.sh timm [SEEDS...]     # a timm student (mobilenetv3_small_050) with CE, KD, CIFD
#   studies/cifar10.sh timmclip [SEEDS...] # the timm student's CIFD with grad_clip 5 (validated)
#   studies/cifar10.sh assistant           # TAKD part 1: ResNet-20 assistant by KD
#   studies/cifar10.sh report              # dvc exp show --json -> docs/cifar10_study
#
# TAKD part 2 (the assistant as teacher) runs in a second workspace: presets/cifar10_takd.yaml.
set -euo pipefail

preset=${PRESET:-presets/cifar10.yaml}

exp() {  # exp NAME [-S key=value ...]: one experiment from the preset
    local name=$1
    shift
    # The study gives every method the paper's settings: it predates the preset's per-method
    # settings (distill.per_method, used by the README's tuned tables), dropped here.
    uv run python -c 'import sys, yaml; p = yaml.safe_load(open(sys.argv[1])); p["distill"].pop("per_method", None)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)' "$preset"
    uv run dvc exp run -n "$name" "$@"  # an existing name fails: `dvc exp remove NAME` first
    cp "$preset" params.yaml  # leave the workspace on the preset for the next piece
}

ablation() {  # ablation KIND SEED: CIFD only, one change against the main experiments
    # rdm.threads=1: the RDM bank retrains beside a student run in the other clone.
    # ++ adds a key the preset leaves to its schema default (plain -S only replaces keys).
    local only_cifd=(-S 'distill.methods=[cifd]' -S 'evaluate.methods=[cifd]')
    case $1 in
        rdm1) exp "rdm1-s$2" -S "distill.seed=$2" -S 'rdm.rate_weights=[4.0]' -S rdm.threads=1 "${only_cifd[@]}" ;;
        rdm5) exp "rdm5-s$2" -S "distill.seed=$2" -S 'rdm.rate_weights=[16.0,8.0,4.0,2.0,1.0]' -S rdm.threads=1 \
                  "${only_cifd[@]}" ;;
        noibm) exp "noibm-s$2" -S "distill.seed=$2" -S '++distill.ibm=false' "${only_cifd[@]}" ;;
    esac
}

piece=${1:?usage: studies/cifar10.sh base|main|ablations|rdm1|rdm5|noibm|timm|timmclip|assistant|report [SEEDS...]}
shift || true
seeds=${*:-0 1 2}
case $piece in
    base)
        cp "$preset" params.yaml
        uv run dvc repro rdm
        ;;
    main)
        for s in $seeds; do exp "main-s$s" -S "distill.seed=$s"; done
        ;;
    ablations)  # every ablation per seed; each is also a piece of its own (rdm1, rdm5, noibm)
        for s in $seeds; do ablation rdm1 "$s"; ablation rdm5 "$s"; ablation noibm "$s"; done
        ;;
    rdm1 | rdm5 | noibm)
        for s in $seeds; do ablation "$piece" "$s"; done
        ;;
    timm)
        for s in $seeds; do
            exp "timm-s$s" -S "distill.seed=$s" -S 'distill.student=mobilenetv3_small_050' \
                -S 'distill.methods=[ce,kd,cifd]' -S 'evaluate.methods=[ce,kd,cifd]'
        done
        ;;
    timmclip)  # the timm student's CIFD with the setting chosen on a validation split (README)
        for s in $seeds; do
            exp "timmclip-s$s" -S "distill.seed=$s" -S 'distill.student=mobilenetv3_small_050' \
                -S '++distill.optim.grad_clip=5.0' -S 'distill.methods=[cifd]' -S 'evaluate.methods=[cifd]'
        done
        ;;
    assistant)
        exp "assistant-s0" -S 'distill.student=pipeline.models.cifar_resnet:resnet20' \
            -S 'distill.methods=[kd]' -S 'evaluate.methods=[kd]'
        ;;
    report)
        uv run dvc exp show --json > "${EXPS:-exps.json}"
        uv run cifd report "${EXPS:-exps.json}" --out "${OUT:-docs/cifar10_study}"
        ;;
    *)
        echo "unknown piece '$piece'; expected base, main, ablations, rdm1, rdm5, noibm, timm, timmclip, assistant or report" >&2
        exit 2
        ;;
esac
