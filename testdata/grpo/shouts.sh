#!/bin/sh
# A site's own scorer for `--reward command:sh testdata/grpo/shouts.sh`: one JSON object per
# line on stdin, one score per line on stdout — here 1 when the completion has a capital letter.
while IFS= read -r line; do
  completion=${line#*\"completion\":\"}
  completion=${completion%%\"*}
  case "$completion" in
    *[A-Z]*) echo 1 ;;
    *) echo 0 ;;
  esac
done
