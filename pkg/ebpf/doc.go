// Package ebpf is svcnat's eBPF dataplane: Service translation with BPF maps
// and programs instead of rule chains. The C side, its maps and the design
// decisions are described in bpf/README.md; this package loads the programs,
// attaches them, and keeps the maps equal to a model.State.
//
// # Maps
//
// The desired state lives in seven maps (see bpf/svcnat.h): svcnat_services
// (frontend address, port, protocol -> ServicePort id, endpoint counts,
// flags), svcnat_slots ((id, set, slot) -> backend id), svcnat_members
// ((id, backend id, set): membership, for remembered choices), svcnat_backends
// (backend id -> address, port, local), svcnat_svc_info (id -> the
// ServicePort's name and the fields Dump needs), svcnat_source_ranges and
// svcnat_cluster_cidrs (LPM tries). encode and decode turn a model.State into
// these entries and back; the round trip is exact, so Dump gives back what
// Sync was given. The datapath writes the rest itself: session affinity (an
// LRU map) and per-socket storage (the frontends a socket sent to and their
// endpoints). The flows of the tc path live in the kernel's conntrack (see
// attach.go).
//
// # Programs
//
// The cgroup socket hooks go on Options.CgroupPath; the tc ingress program
// (TCX, a separate object that needs the conntrack kfuncs) on
// Options.Interfaces, with the nftables table that makes nf_nat run. After
// a sync that changed a ServicePort the backend deletes, in the background,
// the conntrack entries of svcnat's flows that the state no longer allows,
// and after a sync that removes endpoints
// it destroys the connected UDP sockets the hooks pointed at them (a socket
// iterator, when the kernel has bpf_sock_destroy).
//
// # Writing
//
// The reconciler re-encodes only the ServicePorts that changed since the
// last sync and writes the differing entries in an order that never shows
// the datapath a half-written Service: new backends, then slots, then the
// frontends carrying the new counts (one atomic value each), then deletions
// of frontends, slots beyond a smaller count, and last the backends no slot
// names. Backend and ServicePort ids are never reused while an entry may
// still hold them. ServicePorts are admitted in name order while they fit
// the maps; one that does not fit (or cannot be encoded, or claims another's
// frontend) fails alone, named in dataplane.PortErrors, and holds nothing.
// After a failed write, and after CheckDrift (beside the sync loop) found
// entries changed by hand, the sync reads the maps back and rewrites what
// differs.
// The reconciler works on bpfMap[K, V], one typed BPF map each (maps.go
// pairs each with its field of the desired-state table); tests use an
// in-memory fake that fails writes at random and checks, after every
// write, that the datapath's invariant (every slot below a count exists and
// names a backend) holds. The dataplane conformance suite runs on that fake
// without root (TestConformanceFakeKernel) and on the kernel
// (TestConformance).
//
// # Pins and restarts
//
// Maps are pinned under Options.BPFFSPath as <name>-<layout fingerprint>
// (pins.go) and links under its links/ directory. A restarted agent loads
// its programs against the pinned maps and points the pinned links at the
// new programs (bpf_link_update), so translation never stops; its first Sync
// compares with what the kernel holds and writes only the difference. Maps
// of another layout or size are replaced: the first Sync fills the new ones
// before the links are updated. Dump and Raw open the pins
// read-only and need no Init, so `svcnat dump` works from another process.
// Cleanup detaches every pinned link, removes the directory and deletes
// the nftables table.
//
// Init mounts nothing: the parent of Options.BPFFSPath must already be a
// bpffs, or Init fails saying so.
package ebpf
