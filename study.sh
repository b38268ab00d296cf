#!/usr/bin/env bash
# The miniature reproduction: does NCA pre-pre-training help language pre-training at small scale?
#
#   bash study.sh                 # 3 seeds side by side (one thread each): ~50 min on a 2-core CPU
#   SEEDS="0 1 2 3 4" bash study.sh
#
# Arms (every arm then pre-trains on the same Python-stdlib corpus, same seed, same stage-2 data order):
#   scratch            no stage 1
#   nca                stage 1 on NCA rollouts (4 colours, gzip band (0.25, 1): at 4 colours no rule reaches 0.5)
#   dyck               stage 1 on Dyck (balanced brackets), the same token budget and learning rate
#   nca-reinit-attn    the nca stage-1 model, but attention re-initialised before stage 2 (only MLP, norms carried)
#   nca-reinit-mlp     the nca stage-1 model, but MLPs re-initialised before stage 2 (only attention, norms carried)
# Then eval.py compare writes the table and plot of stage-2 validation loss.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/study}
SEEDS=${SEEDS:-"0 1 2"}
# shared: model shape (train.py defaults: 4 layers, width 128, block 256), batch 16 x 256 tokens
COMMON="--eval_interval 50 --eval_iters 20 --log_interval 50 --finetune_iters 0"
STAGE1="--prepretrain_iters 500 --prepretrain_lr 2e-4 --num_colors 4 --band 0.25 1.0"   # 2.0M tokens, gentle
STAGE2="--pretrain_iters 500 --pretrain_lr 2e-3 --pretrain_data stdlib"                  # 2.0M tokens
export OMP_NUM_THREADS=1  # small models: one thread per run and runs side by side use the cores best
mkdir -p $OUT

run_seed() {
  local seed=$1
  python train.py $COMMON $STAGE2 --seed $seed --prepretrain_iters 0 --out_dir $OUT/scratch_seed$seed
  python train.py $COMMON $STAGE1 $STAGE2 --seed $seed --out_dir $OUT/nca_seed$seed
  python train.py $COMMON $STAGE1 $STAGE2 --seed $seed --prepretrain_data dyck --out_dir $OUT/dyck_seed$seed
  for part in attn mlp; do
    group=$([ $part = attn ] && echo attention || echo mlp)
    python train.py $COMMON $STAGE2 --seed $seed --stage pretrain --reinit embedding,head,$group \
      --init_from $OUT/nca_seed$seed/prepretrain/ckpt.pt --out_dir $OUT/nca-reinit-${part}_seed$seed
  done
}

python -m data.stdlib.prepare > /dev/null && python -m data.dyck.prepare > /dev/null  # once, before the runs
for seed in $SEEDS; do
  run_seed $seed > $OUT/seed$seed.log 2>&1 &
done
wait
python eval.py compare --runs "$OUT/*" --stage pretrain --baseline scratch --out $OUT/compare.png | tee $OUT/table.md
