#!/usr/bin/env bash
# The miniature reproduction: does NCA pre-pre-training help language pre-training at small scale?
#
#   bash study.sh                                   # the 4 headline arms x 3 seeds: about 65 minutes on a 2-core CPU
#   SEEDS="3 4" bash study.sh                       # more seeds, added to the same table
#   ARMS="nca-shuffled nca-pool" bash study.sh      # other arms (listed below)
# Every run is started with --resume: an interrupted study continues where it stopped, finished runs are kept.
#
# Every arm then pre-trains on the same Python-stdlib corpus, with the same seed and the same stage-2 data order:
#   scratch            no stage 1
#   nca                stage 1 on NCA rollouts (4 colours, gzip band (0.25, 1): at 4 colours no rule reaches 0.5)
#   dyck               stage 1 on Dyck (balanced brackets), the same token budget and learning rate
#   random             stage 1 on uniform random bytes, the same budget and rate: a warm start with nothing to learn
#   c4                 stage 1 on natural text (needs `python -m data.hf.prepare --dataset c4`, a download)
#   nca-mlp-only       the nca arm's stage-1 model, but attention re-initialised before stage 2 (MLP, norms carried)
#   nca-attention-only the nca arm's stage-1 model, but MLPs re-initialised before stage 2 (attention, norms carried)
# what transfers, and why (each the nca arm with one thing changed, unless said):
#   nca-shuffled       the same NCA sequences with each sequence's patch tokens permuted: NCA's token statistics,
#                      no dynamics
#   nca-pool           a fixed pool of 800 rules reused with fresh grids (10 epochs over stage 1's 8000 sequences,
#                      as the paper's 16,000 rules x 10 epochs) instead of a fresh rule per sequence
#   nca-torch-init     embedding and head re-initialised with PyTorch's defaults (N(0,1) embedding) before stage 2
#   scratch-torch-init the scratch arm with PyTorch's defaults for embedding and head, as the authors' scratch arm ran
#   nca-recipe         the authors' code as it ran: the pool, a stage-1 rate ramped up and never decayed, PyTorch's
#                      re-initialisation
#   nca-band-low, nca-band-mid, nca-band-high
#                      three complexity bands at 4 colours, between quantiles of that alphabet's gzip-ratio
#                      distribution (python study.py stats --num_colors 4 --rules 2000 --quantiles ...)
#   scratch-w256, nca-w256, dyck-w256
#                      scratch, nca and dyck with a wider model (width 256: 3.3M parameters instead of 0.87M), the same
#                      tokens: does the gain grow or shrink with size? (compare against scratch-w256; ~2x the time)
#   scratch-w512, nca-w512, dyck-w512
#                      the same at width 512 (13M parameters; about 3.3x the time of width 256), stage 2 at lr 1e-3:
#                      chosen on scratch alone, before the NCA arms' stage 2, against scratch-lr2e-3-w512 (the other
#                      widths' 2e-3)
#   scratch-lr2e-3-w512
#                      the rate probe: scratch at width 512 with the other widths' stage-2 rate, 2e-3
#   nca-torch-init-w256, scratch-torch-init-w256
#                      the initialisation question at width 256 (as nca-torch-init and scratch-torch-init)
#   nca-attention-only-w256, nca-mlp-only-w256, nca-attention-only-w512, nca-mlp-only-w512
#                      the same two at widths 256 and 512, from the nca-w256 (nca-w512) arm's stage 1 of the seed
#                      (stage 1 runs once per seed); embedding and head re-initialised, norms carried, as always
#   nca-lr5e-4-w512, nca-lr2e-3-w512
#                      the stage-2 rate probe of the NCA arm at width 512: nca-w512's stage-1 checkpoint, stage 2 at
#                      5e-4 or 2e-3 instead of the 1e-3 chosen on scratch alone
#   scratch-w512-bf16, nca-w512-bf16, nca-attention-only-w512-bf16, nca-mlp-only-w512-bf16
#   nca-lr5e-4-w512-bf16, nca-lr2e-3-w512-bf16
#                      the width-512 arms above with bfloat16 autocast in both stages (--dtype bfloat16, ~2.6x faster
#                      on a CPU with AMX); they pair with each other only, never with the float32 runs
#   scratch-lr5e-4-w512-bf16
#                      scratch-w512-bf16 at stage-2 rate 5e-4, the rate the NCA arm's probe preferred: is it better
#                      for scratch too?
#   nca-lr2.5e-4-w512-bf16, scratch-lr2.5e-4-w512-bf16
#                      one step lower, both arms: 5e-4 was the lowest rate of the probe and it won for both
# exploration (one knob of the nca or dyck arm changed each):
#   nca-10colours      the paper's alphabet and band: 10 colours, band (0.5, 1)
#   nca-lr1e-3         stage-1 learning rate 1e-3 instead of 2e-4
#   nca-long           3x the stage-1 tokens (1500 iterations, 6.1M tokens)
#   dyck-long          the same for the Dyck control: does NCA pull ahead of Dyck with more stage-1 tokens?
# Then study.py compare writes the table and plot of stage-2 validation loss against the scratch arm (scratch-w256 when
# ARMS has a w256 arm).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/study}
SEEDS=${SEEDS:-"0 1 2"}
ARMS=${ARMS:-"scratch nca dyck random"}
# shared: model shape (train.py defaults: 4 layers, width 128, block 256), batch 16 x 256 tokens
COMMON="--eval_interval 50 --eval_iters 20 --log_interval 50 --finetune_iters 0 --device cpu --resume"
STAGE1="--prepretrain_iters 500 --prepretrain_lr 2e-4 --num_colors 4 --band 0.25 1.0"   # 2.0M tokens, gentle
WIDE="--n_embd 256"                                                                       # the w256 arms
WIDER="--n_embd 512 --pretrain_lr 1e-3"  # the w512 arms: at 2e-3 scratch-w512 trailed width 256 (scratch-lr2e-3-w512)
BF16="--dtype bfloat16"                                                                    # the -bf16 arms
STAGE2="--pretrain_iters 500 --pretrain_lr 2e-3 --pretrain_data stdlib"                  # 2.0M tokens
export OMP_NUM_THREADS=1  # small models: one thread per run and runs side by side use the cores best
mkdir -p $OUT

lr_of() { echo $1 | sed 's/^[a-z]*-lr\(.*\)-w512.*/\1/'; }  # lr_of nca-lr5e-4-w512-bf16 prints 5e-4

from_nca_stage1() {  # from_nca_stage1 <arm> <seed> <dir>: stage 2 only, from the stage-1 checkpoint of the width's nca arm
  local arm=$1 seed=$2 dir=$3 width="" flags="" reinit=embedding,head lr=""
  if [[ $arm == *-w256 ]]; then width=-w256 flags=$WIDE; fi
  if [[ $arm == *-w512* ]]; then width=-w512 flags=$WIDER; fi
  if [[ $arm == *-bf16 ]]; then width=$width-bf16 flags="$flags $BF16"; fi
  if [[ $arm == nca-attention-only* ]]; then reinit=embedding,head,mlp; fi
  if [[ $arm == nca-mlp-only* ]]; then reinit=embedding,head,attention; fi
  if [[ $arm == nca-lr* ]]; then lr="--pretrain_lr $(lr_of $arm)"; fi
  python train.py $COMMON $STAGE1 $flags --stage prepretrain --seed $seed --out_dir $OUT/nca${width}_seed$seed
  python train.py $COMMON $STAGE2 $flags $lr --stage pretrain --reinit $reinit \
    --init_from $OUT/nca${width}_seed$seed/prepretrain/ckpt.pt --seed $seed --out_dir $dir
}

run_arm() {  # run_arm <arm> <seed>
  local arm=$1 seed=$2 dir=$OUT/$1_seed$2
  case $arm in
    scratch)         python train.py $COMMON $STAGE2 --prepretrain_iters 0 --seed $seed --out_dir $dir ;;
    scratch-torch-init)
                     python train.py $COMMON $STAGE2 --prepretrain_iters 0 --embed_init torch --seed $seed --out_dir $dir ;;
    nca)             python train.py $COMMON $STAGE1 $STAGE2 --seed $seed --out_dir $dir ;;
    dyck|random|c4)  python train.py $COMMON $STAGE1 $STAGE2 --prepretrain_data $arm --seed $seed --out_dir $dir ;;
    nca-attention-only|nca-mlp-only|nca-attention-only-w256|nca-mlp-only-w256)
                     from_nca_stage1 $arm $seed $dir ;;
    nca-attention-only-w512|nca-mlp-only-w512|nca-lr5e-4-w512|nca-lr2e-3-w512)
                     from_nca_stage1 $arm $seed $dir ;;
    nca-attention-only-w512-bf16|nca-mlp-only-w512-bf16|nca-lr5e-4-w512-bf16|nca-lr2e-3-w512-bf16)
                     from_nca_stage1 $arm $seed $dir ;;
    nca-lr2.5e-4-w512-bf16)
                     from_nca_stage1 $arm $seed $dir ;;
    nca-shuffled)    python train.py $COMMON $STAGE1 $STAGE2 --prepretrain_data nca-shuffled --seed $seed --out_dir $dir ;;
    nca-pool)        python train.py $COMMON $STAGE1 $STAGE2 --nca_num_rules 800 --seed $seed --out_dir $dir ;;
    nca-torch-init)  python train.py $COMMON $STAGE1 $STAGE2 --embed_init torch --seed $seed --out_dir $dir ;;
    nca-recipe)      python train.py $COMMON $STAGE1 $STAGE2 --nca_num_rules 800 --prepretrain_schedule ramp \
                       --embed_init torch --seed $seed --out_dir $dir ;;
    nca-band-low)    python train.py $COMMON $STAGE1 $STAGE2 --band 0.082 0.203 --seed $seed --out_dir $dir ;;
    nca-band-mid)    python train.py $COMMON $STAGE1 $STAGE2 --band 0.204 0.322 --seed $seed --out_dir $dir ;;
    nca-band-high)   python train.py $COMMON $STAGE1 $STAGE2 --band 0.323 1.0 --seed $seed --out_dir $dir ;;
    scratch-w256)    python train.py $COMMON $STAGE2 --prepretrain_iters 0 $WIDE --seed $seed --out_dir $dir ;;
    nca-w256)        python train.py $COMMON $STAGE1 $STAGE2 $WIDE --seed $seed --out_dir $dir ;;
    dyck-w256)       python train.py $COMMON $STAGE1 $STAGE2 $WIDE --prepretrain_data dyck --seed $seed --out_dir $dir ;;
    nca-torch-init-w256)
                     python train.py $COMMON $STAGE1 $STAGE2 $WIDE --embed_init torch --seed $seed --out_dir $dir ;;
    scratch-torch-init-w256)
                     python train.py $COMMON $STAGE2 --prepretrain_iters 0 $WIDE --embed_init torch --seed $seed \
                       --out_dir $dir ;;
    scratch-w512)    python train.py $COMMON $STAGE2 --prepretrain_iters 0 $WIDER --seed $seed --out_dir $dir ;;
    scratch-lr2e-3-w512)
                     python train.py $COMMON $STAGE2 --prepretrain_iters 0 --n_embd 512 --seed $seed --out_dir $dir ;;
    nca-w512)        python train.py $COMMON $STAGE1 $STAGE2 $WIDER --seed $seed --out_dir $dir ;;
    scratch-w512-bf16)
                     python train.py $COMMON $STAGE2 --prepretrain_iters 0 $WIDER $BF16 --seed $seed --out_dir $dir ;;
    nca-w512-bf16)   python train.py $COMMON $STAGE1 $STAGE2 $WIDER $BF16 --seed $seed --out_dir $dir ;;
    scratch-lr5e-4-w512-bf16|scratch-lr2.5e-4-w512-bf16)
                     python train.py $COMMON $STAGE2 --prepretrain_iters 0 $WIDER $BF16 \
                       --pretrain_lr $(lr_of $arm) --seed $seed --out_dir $dir ;;
    dyck-w512)       python train.py $COMMON $STAGE1 $STAGE2 $WIDER --prepretrain_data dyck --seed $seed --out_dir $dir ;;
    nca-10colours)   python train.py $COMMON $STAGE1 $STAGE2 --num_colors 10 --band 0.5 1.0 --seed $seed --out_dir $dir ;;
    nca-lr1e-3)      python train.py $COMMON $STAGE1 $STAGE2 --prepretrain_lr 1e-3 --seed $seed --out_dir $dir ;;
    nca-long)        python train.py $COMMON $STAGE1 $STAGE2 --prepretrain_iters 1500 --seed $seed --out_dir $dir ;;
    dyck-long)       python train.py $COMMON $STAGE1 $STAGE2 --prepretrain_iters 1500 --prepretrain_data dyck \
                       --seed $seed --out_dir $dir ;;
    *) echo "study.sh: unknown arm '$arm' in ARMS" >&2; exit 2 ;;
  esac
}

for corpus in stdlib dyck random; do python -m data.$corpus.prepare > /dev/null; done  # once, before the runs
for seed in $SEEDS; do  # seeds side by side, the arms of one seed in order
  (for arm in $ARMS; do run_arm $arm $seed; done) > $OUT/seed$seed.$(echo $ARMS | tr ' ' '+').log 2>&1 &
done
wait
BASE=scratch  # the scratch arm of the arms' own width and precision
case " $ARMS " in
  *-w256\ *) BASE=scratch-w256 ;; *-w512\ *) BASE=scratch-w512 ;; *-w512-bf16\ *) BASE=scratch-w512-bf16 ;;
esac
RUNS=$(for arm in $BASE $ARMS; do echo "$OUT/${arm}_seed*"; done | sort -u)  # these arms against the baseline
python study.py compare --runs $RUNS --stage pretrain --baseline $BASE --out $OUT/compare.png | tee $OUT/table.md
