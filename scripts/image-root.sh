#!/usr/bin/env bash
# Makes the root file system of svcnat's image from this machine's installed
# Debian packages, without a registry or network: iptables (nf_tables and
# legacy variants, as in the Dockerfile's debian:bookworm-slim plus iptables)
# and the packages it depends on, with Debian's merged /usr layout and the
# update-alternatives links that make `iptables` the nf_tables variant.
#   scripts/image-root.sh DIR
set -euo pipefail
root=${1:?usage: image-root.sh DIR}
rm -rf "$root"
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{etc/alternatives,tmp,run,var/lib,proc,sys,dev}
chmod 1777 "$root/tmp"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done

# The package and its dependencies (Depends and Pre-Depends), recursively.
declare -A seen=()
queue=(iptables)
while ((${#queue[@]})); do
	p=${queue[0]}
	queue=("${queue[@]:1}")
	[[ -n ${seen[$p]:-} ]] && continue
	seen[$p]=1
	deps=$(dpkg-query -W -f='${Pre-Depends}, ${Depends}' "$p")
	for d in $(tr ',|' '\n\n' <<<"$deps" | sed -E 's/\(.*\)//; s/:any//; s/^ +| +$//g' | grep -v '^$' | sort -u); do
		# Skip alternatives that are not installed (virtual or unused).
		dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" && queue+=("$d")
	done
done

files=$(for p in "${!seen[@]}"; do dpkg -L "$p"; done |
	grep -Ev '^/usr/share/(doc|man|info|locale|lintian|bug)/' | sort -u |
	while read -r f; do
		if [[ -L $f || -f $f ]]; then echo "${f#/}"; fi
	done)
tar -C / --no-recursion -cf - $files | tar -C "$root" --keep-directory-symlink -xf -

# update-alternatives' links for the iptables family (the nf_tables variant).
for l in /etc/alternatives/*; do
	case $(basename "$l") in
	iptables* | ip6tables* | arptables* | ebtables*) cp -P "$l" "$root/etc/alternatives/" ;;
	esac
done
for f in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
	[[ -e $root/usr/sbin/$f || -L $root/usr/sbin/$f ]] || ln -s "/etc/alternatives/$f" "$root/usr/sbin/$f"
done
echo "image-root: ${#seen[@]} packages: ${!seen[*]}"
