// Package memtest measures memory for benchmarks.
package memtest

import "runtime"

// LiveHeap returns the bytes of heap that the value build returns keeps
// alive, measured after a garbage collection before and after build.
func LiveHeap(build func() any) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v := build()
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(v)
	return after.HeapAlloc - before.HeapAlloc
}
