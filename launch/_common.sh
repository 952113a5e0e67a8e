# Shared by the launch scripts (sourced, not run): argument checks and the dry-run printer.
# Each script defines usage() before sourcing this file.

# A positive integer?
is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# Print a command (with its environment assignments) as one shell-quoted line.
show() { local out; printf -v out '%q ' "$@"; printf '%s\n' "${out% }"; }

# The dry-run switch from MEMLM_DRY_RUN ("" or 0: off).
dry_default() { local d="${MEMLM_DRY_RUN:-}"; [ "$d" = 0 ] && d=""; printf '%s' "$d"; }

# Refuse the process-layout flags the script sets itself: refuse_layout_flags WHY ARGS...
refuse_layout_flags() {
  local why=$1 a
  shift
  for a in "$@"; do
    case $a in
      --coordinator|--coordinator=*|--num-processes|--num-processes=*|--process-id|--process-id=*|\
      --local-device-ids|--local-device-ids=*)
        usage "$a$why" ;;
    esac
  done
}
