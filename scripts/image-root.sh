#!/usr/bin/env bash
# Makes an image's root file system from this machine's installed Debian
# packages, without a registry or network: the packages named (by default
# iptables, svcnat's image: nf_tables and legacy variants, as in the
# Dockerfile's debian:bookworm-slim plus iptables) and those they depend on,
# with Debian's merged /usr layout and the update-alternatives links of the
# programs they hold (`iptables` is the nf_tables variant, as on the host).
#   scripts/image-root.sh DIR [PACKAGE...]
set -euo pipefail
root=${1:?usage: image-root.sh DIR [PACKAGE...]}
shift
(($#)) || set -- iptables
rm -rf "$root"
mkdir -p "$root"/usr/{bin,sbin,lib,lib64} "$root"/{etc/alternatives,tmp,run,var/lib,proc,sys,dev}
chmod 1777 "$root/tmp"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done

# The package and its dependencies (Depends and Pre-Depends), recursively.
declare -A seen=()
queue=("$@")
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

# update-alternatives' links whose current choice the root holds, e.g.
# iptables -> iptables-nft, nc -> nc.openbsd.
for a in /var/lib/dpkg/alternatives/*; do
	q=$(update-alternatives --query "$(basename "$a")" 2>/dev/null) || continue
	value=$(sed -n 's/^Value: //p' <<<"$q")
	[[ -n $value && ( -e $root$value || -L $root$value ) ]] || continue
	# The master link and the slaves outside the documentation, each a link
	# to /etc/alternatives/NAME, which links to the choice.
	sed -n 's/^Link: //p; s/^ [^ ]* \(\/.*bin\/.*\)$/\1/p' <<<"$q" | while read -r link; do
		name=$(readlink "$link" 2>/dev/null || true)
		[[ $name == /etc/alternatives/* ]] || continue
		cp -P "$name" "$root/etc/alternatives/"
		[[ -e $root$link || -L $root$link ]] || ln -s "$name" "$root$link"
	done
done
echo "image-root: ${#seen[@]} packages: ${!seen[*]}"
