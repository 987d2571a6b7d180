#!/usr/bin/env bash
# The source papers' claims measured in the tool (issue 15), as DVC experiments on one cache
# with 12 views per image: views 0-7 plain (view 0 the clean image), 8-11 mixed (mixup,
# alpha 1). Each student draws from a list of those views (distill.views) and, for the few-
# teacher-calls study, a seeded fraction of the images (distill.rows_fraction); the metrics
# record the teacher forwards behind its targets. Run from the repository root; the
# preset's data must be there (the CIFAR-10 preset needs ../shared).
#
#   studies/claims.sh base                    # prepare, teacher, the 12-view cache, RDMs
#   studies/claims.sh consistency [SEEDS...]  # KD, CIFD: V = 1 clean / 1 random / 4 / 8 / 8 with mixup
#   studies/claims.sh calls [SEEDS...]        # few teacher calls: KD, KD + comparative term, CIFD
#   studies/claims.sh patience                # KD, DGKD, CIFD at 15 and 60 epochs (PATIENCE_PRESET)
#   studies/claims.sh report                  # dvc exp show --json -> cifd report -> docs/claims/ (paired with KD),
#                                             # docs/claims/consistency/ (the five variants paired with v1clean)
#
# VARIANTS (default "v1clean v1rand v4 v8 v8mix") lists the consistency variants, in the order
# they run. PRESET (default presets/cifar10.yaml) is the pipeline the experiments change; PATIENCE_PRESET
# (default presets/cifar10_gpu.yaml: all 50,000 images) the one of the patience piece;
# PATIENCE_VIEWS (a view list such as [0,1,2,3]) runs that piece on this study's 12-view cache
# and PRESET instead (the CPU-sized run), PATIENCE_EPOCHS (default "15 60") its schedules and
# PATIENCE_METHODS (default kd,dgkd,cifd) its students. CKD is
# the comparative term's weight (default 1.0), CKD_FULL (default "v1clean v4 v8") the all-images
# view lists it runs in the calls piece. OUT is where report writes (default docs/claims).
set -euo pipefail

preset=${PRESET:-presets/cifar10.yaml}
snapshot=$(mktemp)  # the preset as it was (PRESET=params.yaml: dvc exp run leaves params.yaml changed)
cp "$preset" "$snapshot"
trap 'rm -f "$snapshot"' EXIT
cache=(-S embed.views=12 -S '++embed.mixup.views=4' -S '++embed.mixup.alpha=1.0')
kd_cifd=(-S 'distill.methods=[kd,cifd]' -S 'evaluate.methods=[kd,cifd]')
only_kd=(-S 'distill.methods=[kd]' -S 'evaluate.methods=[kd]')

exp() {  # exp NAME [-S key=value ...]: one experiment from the preset on the 12-view cache
    local name=$1
    shift
    cp "$snapshot" params.yaml
    uv run dvc exp run -n "$name" "${cache[@]}" "$@"  # an existing name fails: `dvc exp remove NAME` first
    cp "$snapshot" params.yaml  # leave the workspace on the preset for the next piece
}

views() {  # the distill.views list of a consistency variant
    case $1 in
        v1clean) echo '[0]' ;;                    # the naive cache: one clean output per image
        v1rand) echo '[1]' ;;                     # one random crop per image, fixed
        v4) echo '[0,1,2,3]' ;;
        v8) echo '[0,1,2,3,4,5,6,7]' ;;
        v8mix) echo '[0,1,2,3,8,9,10,11]' ;;      # 8 views, 4 of them mixed: the same teacher budget as v8
    esac
}

piece=${1:?usage: studies/claims.sh base|consistency|calls|patience|report [SEEDS...]}
shift || true
seeds=${*:-0 1 2}
case $piece in
    base)
        cp "$snapshot" params.yaml
        uv run dvc exp run -n claims-base "${cache[@]}" rdm
        cp "$snapshot" params.yaml
        ;;
    consistency)
        for s in $seeds; do
            for v in ${VARIANTS:-v1clean v1rand v4 v8 v8mix}; do
                exp "$v-s$s" -S "distill.seed=$s" -S "++distill.views=$(views $v)" "${kd_cifd[@]}"
            done
        done
        ;;
    calls)  # v1clean, v4, v8 of the consistency piece are this study's full-data points for KD and CIFD
        for s in $seeds; do
            for r in 25 50; do
                exp "r$r-s$s" -S "distill.seed=$s" -S '++distill.views=[0]' -S "++distill.rows_fraction=0.$r" \
                    "${kd_cifd[@]}"
                exp "ckd_r$r-s$s" -S "distill.seed=$s" -S '++distill.views=[0]' -S "++distill.rows_fraction=0.$r" \
                    -S "++distill.ckd_weight=${CKD:-1.0}" "${only_kd[@]}"
            done
            for v in ${CKD_FULL:-v1clean v4 v8}; do
                exp "ckd_$v-s$s" -S "distill.seed=$s" -S "++distill.views=$(views $v)" \
                    -S "++distill.ckd_weight=${CKD:-1.0}" "${only_kd[@]}"
            done
        done
        ;;
    patience)  # one seed: only the schedule changes
        methods=${PATIENCE_METHODS:-kd,dgkd,cifd}
        three=(-S "distill.methods=[$methods]" -S "evaluate.methods=[$methods]")
        for e in ${PATIENCE_EPOCHS:-15 60}; do
            if [[ -n ${PATIENCE_VIEWS:-} ]]; then  # this study's cache, the view list given
                exp "patience_e$e-s0" -S "distill.epochs=$e" -S "++distill.views=$PATIENCE_VIEWS" "${three[@]}"
            else  # the patience preset's own cache (no view list)
                cp "${PATIENCE_PRESET:-presets/cifar10_gpu.yaml}" params.yaml
                uv run dvc exp run -n "patience_e$e-s0" -S "distill.epochs=$e" "${three[@]}"
                cp "$snapshot" params.yaml
            fi
        done
        ;;
    report)
        uv run dvc exp show --json > "${EXPS:-exps_claims.json}"
        uv run cifd report "${EXPS:-exps_claims.json}" --out "${OUT:-docs/claims}" --against-method kd
        # the consistency piece alone, each variant paired seed by seed with the naive cache
        uv run cifd report "${EXPS:-exps_claims.json}" --out "${OUT:-docs/claims}/consistency" \
            --variants "$(echo ${VARIANTS:-v1clean v1rand v4 v8 v8mix} | tr ' ' ,)" --against-variant v1clean
        # the calls piece alone: its budget plot without the other pieces' points
        uv run cifd report "${EXPS:-exps_claims.json}" --out "${OUT:-docs/claims}/calls" --against-method kd \
            --variants "r25,r50,v1clean,v4,v8,ckd_r25,ckd_r50$(printf ',ckd_%s' ${CKD_FULL:-v1clean v4 v8})"
        ;;
    *)
        echo "unknown piece '$piece'; expected base, consistency, calls, patience or report" >&2
        exit 2
        ;;
esac
