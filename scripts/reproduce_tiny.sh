#!/bin/bash
# Every command of docs/reproduce.md on tiny stand-ins of the paper's data sets, on the CPU, each
# timed: prints the page's table of wall times (markdown rows). The checkpoints are replaced by a
# 2-layer model from scratch and the batches by 8 rows; the judge by scripts/standins.py's
# stand-in on 127.0.0.1:8765. Writes under out/tiny/ (removed first).
#     bash scripts/reproduce_tiny.sh
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
T=out/tiny
rm -rf $T
mkdir -p $T
TINY="--init scratch --tokenizer bytes --n-layer 2 --n-head 2 --n-embd 64 --block-size 512 \
    --device cpu"
B="--batch-size 8 --micro-batch-size 8"
step() {  # step LABEL COMMAND...: run it, quiet; print a table row with its wall time
    local label="$1"; shift
    local start=$(date +%s%N)
    "$@" > $T/last.out 2> $T/last.err || { echo "FAILED: $*"; tail -5 $T/last.err; exit 1; }
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf "| %s | %d.%d s |\n" "$label" $(( ms / 1000 )) $(( ms % 1000 / 100 ))
}
step "standins.py write" python scripts/standins.py write $T/downloads
echo "| **Table 3** | |"
step "prepare_data.py gsm8k (train)" \
    python scripts/prepare_data.py gsm8k $T/downloads/gsm8k/train.jsonl \
    --out $T/data/gsm8k-train.jsonl
step "prepare_data.py math (train, release folders)" \
    python scripts/prepare_data.py math $T/downloads/MATH/train \
    --out $T/data/math-train.jsonl
step "prepare_data.py gsm8k (test)" \
    python scripts/prepare_data.py gsm8k $T/downloads/gsm8k/test.jsonl \
    --out $T/data/gsm8k-test.jsonl
step "prepare_data.py math (test)" python scripts/prepare_data.py math $T/downloads/MATH/test \
    --out $T/data/math-test.jsonl
cat $T/data/gsm8k-train.jsonl $T/data/math-train.jsonl > $T/data/mathqa-train.jsonl
step "train.py sft, 1 epoch" python train.py $TINY --data $T/data/mathqa-train.jsonl --task math \
    --method sft --iter-epochs 1 --lr 5e-6 --min-lr 0 --warmup 0.1 $B --precision bf16 \
    --out $T/math-sft
step "train.py bash, 1 iteration" python train.py --init $T/math-sft/checkpoint --device cpu \
    --data $T/data/mathqa-train.jsonl --task math --method bash --iterations 1 --iter-epochs 1 \
    --beta 0.2 --lr 5e-6 --min-lr 0 --warmup 0.1 $B --precision bf16 --build-memory-gb 30 \
    --out $T/math-bash
step "train.py rac, 1 iteration" python train.py --init $T/math-sft/checkpoint --device cpu \
    --data $T/data/mathqa-train.jsonl --task math --method rac --iterations 1 --iter-epochs 1 \
    --lr 5e-6 --min-lr 0 --warmup 0.1 $B --precision bf16 --out $T/math-rac
step "torchrun --nproc_per_node=2 train.py --fsdp rac" torchrun --nproc_per_node=2 train.py \
    --fsdp --init $T/math-sft/checkpoint --device cpu --data $T/data/mathqa-train.jsonl \
    --task math --method rac --iterations 1 --iter-epochs 1 --lr 5e-6 --min-lr 0 --warmup 0.1 $B \
    --out $T/math-rac-fsdp
step "eval_checkpoint.py GSM8K test, 3 samples at 0.1" python scripts/eval_checkpoint.py \
    --init $T/math-bash/checkpoint --data $T/data/gsm8k-test.jsonl --temperature 0.1 --samples 3 \
    --device cpu
step "eval_checkpoint.py MATH test, 3 samples at 0.1" python scripts/eval_checkpoint.py \
    --init $T/math-bash/checkpoint --data $T/data/math-test.jsonl --temperature 0.1 --samples 3 \
    --device cpu
echo "| **Table 1** | |"
step "prepare_data.py tldr (train)" \
    python scripts/prepare_data.py tldr $T/downloads/tldr/train.jsonl \
    --out $T/data/tldr-train.jsonl
step "prepare_data.py tldr (test)" \
    python scripts/prepare_data.py tldr $T/downloads/tldr/test.jsonl \
    --out $T/data/tldr-test.jsonl
step "train.py sft, 2 epochs" python train.py $TINY --data $T/data/tldr-train.jsonl \
    --task summarize --method sft --iter-epochs 2 --lr 3e-6 --min-lr 0 --warmup 0 $B \
    --precision bf16 --seed 0 --out $T/tldr-sft-s0
step "train.py neftune, 2 epochs" python train.py $TINY --data $T/data/tldr-train.jsonl \
    --task summarize --method neftune --iter-epochs 2 --lr 3e-6 --min-lr 0 --warmup 0 $B \
    --precision bf16 --seed 0 --out $T/tldr-neftune-s0
step "train.py rac, 1 iteration" python train.py --init $T/tldr-sft-s0/checkpoint --device cpu \
    --data $T/data/tldr-train.jsonl --task summarize --method rac --iterations 1 --iter-epochs 1 \
    --lr 3e-6 --min-lr 0 --warmup 0 $B --precision bf16 --seed 0 --out $T/tldr-rac-s0
step "train.py bash, 1 iteration" python train.py --init $T/tldr-sft-s0/checkpoint --device cpu \
    --data $T/data/tldr-train.jsonl --task summarize --method bash --iterations 1 \
    --iter-epochs 1 --lr 3e-6 --min-lr 0 --warmup 0 $B --precision bf16 --seed 0 \
    --out $T/tldr-bash-s0
step "train.py spin, 1 iteration" python train.py --init $T/tldr-sft-s0/checkpoint --device cpu \
    --data $T/data/tldr-train.jsonl --task summarize --method spin --dpo-beta 0.1 --iterations 1 \
    --iter-epochs 1 --lr 3e-6 --min-lr 0 --warmup 0 $B --precision bf16 --seed 0 \
    --out $T/tldr-spin-s0
step "eval_checkpoint.py TL;DR test at 0.01, --generations" python scripts/eval_checkpoint.py \
    --init $T/tldr-rac-s0/checkpoint --data $T/data/tldr-test.jsonl --task summarize \
    --temperature 0.01 --device cpu --generations $T/tldr-rac-s0/test.gen.jsonl
python scripts/standins.py judge --port 8765 > $T/judge.log 2>&1 &
JUDGE=$!
trap 'kill $JUDGE 2> /dev/null' EXIT
sleep 2
step "judge.py --template tldr (stand-in judge)" \
    python scripts/judge.py $T/tldr-rac-s0/test.gen.jsonl \
    --template tldr --judge-url http://127.0.0.1:8765/v1 --judge-model stand-in
step "judge.py again (all cached: nothing asked)" \
    python scripts/judge.py $T/tldr-rac-s0/test.gen.jsonl \
    --template tldr --judge-url http://127.0.0.1:8765/v1 --judge-model stand-in
echo "| **Table 2** | |"
step "prepare_data.py ultrachat --sample 24" \
    python scripts/prepare_data.py ultrachat $T/downloads/ultrachat/train_sft.jsonl \
    --sample 24 --seed 0 --out $T/data/uc-train.jsonl
step "prepare_data.py alpaca_eval" \
    python scripts/prepare_data.py alpaca_eval $T/downloads/alpaca_eval.json \
    --out $T/data/alpaca-eval.jsonl
step "train.py sft (a stand-in for mistral-7b-sft-beta)" python train.py $TINY \
    --data $T/data/uc-train.jsonl --task chat --method sft --iter-epochs 1 $B --out $T/uc-sft
step "train.py rac, iteration 1 (1 epoch)" python train.py --init $T/uc-sft/checkpoint \
    --device cpu --data $T/data/uc-train.jsonl --task chat --method rac --iterations 1 \
    --iter-epochs 1 --lr 5e-6 --min-lr 0 --warmup 0.1 $B --precision bf16 --build-memory-gb 30 \
    --out $T/uc-rac-it1
step "train.py rac, iteration 2 (2 epochs)" python train.py --init $T/uc-rac-it1/checkpoint \
    --device cpu --data $T/data/uc-train.jsonl --task chat --method rac --iterations 1 \
    --iter-epochs 2 --lr 5e-6 --min-lr 0 --warmup 0.1 $B --precision bf16 --build-memory-gb 30 \
    --out $T/uc-rac-it2
step "eval_checkpoint.py AlpacaEval, 3 samples at 0.7" python scripts/eval_checkpoint.py \
    --init $T/uc-rac-it2/checkpoint --data $T/data/alpaca-eval.jsonl --temperature 0.7 \
    --samples 3 --device cpu --generations $T/uc-rac-it2/alpaca.gen.jsonl
step "eval_checkpoint.py AlpacaEval, greedy" python scripts/eval_checkpoint.py \
    --init $T/uc-rac-it2/checkpoint --data $T/data/alpaca-eval.jsonl --temperature 0 \
    --device cpu --generations $T/uc-rac-it2/alpaca-greedy.gen.jsonl
step "alpaca_outputs.py --sample 0" \
    python scripts/alpaca_outputs.py $T/uc-rac-it2/alpaca.gen.jsonl --sample 0 \
    --generator rac-it2 --out $T/uc-rac-it2/alpaca_outputs-0.json
step "judge.py --template qa (stand-in judge)" \
    python scripts/judge.py $T/uc-rac-it2/alpaca.gen.jsonl \
    --template qa --judge-url http://127.0.0.1:8765/v1 --judge-model stand-in
echo "| **Table 4** | |"
step "prepare_data.py ultrafeedback" \
    python scripts/prepare_data.py ultrafeedback $T/downloads/ultrafeedback/train_prefs.jsonl \
    --out $T/data/uf-pairs.jsonl
step "train.py dpo, 1 epoch" python train.py --init $T/uc-rac-it2/checkpoint --device cpu \
    --data $T/data/uf-pairs.jsonl --task chat --method dpo --iter-epochs 1 --dpo-beta 0.01 \
    --lr 5e-7 --min-lr 0 --warmup 0.1 --batch-size 8 --micro-batch-size 4 --precision bf16 \
    --out $T/uc-rac-dpo
step "eval_checkpoint.py AlpacaEval after DPO" python scripts/eval_checkpoint.py \
    --init $T/uc-rac-dpo/checkpoint --data $T/data/alpaca-eval.jsonl --temperature 0.7 \
    --samples 3 --device cpu --generations $T/uc-rac-dpo/alpaca.gen.jsonl
kill $JUDGE

