# Sourced by the recipe's long jobs (head_to_head.sh, long_run.sh): the training data of the
# head-to-head arms in ./data (the current folder), made once.
#
#   prepare_arm_data ADQA
# The recipe's files plus the wiki (trainable half) reconstruction and cloze records, all
# labelled with the same zlib reference as train_proxy.jsonl. Skipped when data/.done exists.

prepare_arm_data() {
  local ADQA="$1"
  [[ -f data/.done ]] && return 0
  "$PY" "$HERE/prepare_data.py" --adversarialqa "$ADQA" --out data
  "${CLI[@]}" synth cloze data/wiki_trainable.jsonl --text-field text --min-words 1 --max-words 1000 \
    --out data/wiki_cloze.jsonl
  local REF
  REF="$("$PY" -c "import json; print(json.load(open('data/split.json'))['zlib_reference'])")"
  for f in train wiki_recon wiki_cloze; do
    "${CLI[@]}" synth proxy "data/$f.jsonl" --out "data/${f}_proxy.jsonl" --method zlib --y-mid 2.5 --gain 4 \
      --reference "$REF"
  done
  # the wiki texts that got no cloze question stay reconstruction records in the cloze arms
  "$PY" - <<'EOF'
import json
from semidyn_rag.training.data import context_key  # whitespace-blind: the cloze chunks are normalised
cloze = {context_key(json.loads(x)["context"]) for x in open("data/wiki_cloze_proxy.jsonl")}
rest = [x for x in open("data/wiki_recon_proxy.jsonl") if context_key(json.loads(x)["context"]) not in cloze]
open("data/wiki_recon_rest_proxy.jsonl", "w").writelines(rest)
print(f"{len(rest)} wiki texts without a cloze question kept as reconstruction records")
EOF
  touch data/.done
}
