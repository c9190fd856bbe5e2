package imagebuild

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// TestWrite reads back a written archive the way an importer does: the
// manifest names the config and the layer, the config's diff_id is the
// layer's digest, and the layer holds the root's tree, the added file (with
// its parent directories) and the link.
func TestWrite(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "hello"), []byte("hi"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("usr/bin", filepath.Join(root, "bin")); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "agent")
	if err := os.WriteFile(bin, []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	err := Write(&buf, Spec{Tags: []string{"x:1", "x:2"}, Root: root,
		Files: map[string]string{"/usr/local/bin/agent": bin, "/bin/agent2": bin}, Links: map[string]string{"/usr/bin/sh": "busybox"},
		Entrypoint: []string{"/usr/local/bin/agent"}, Cmd: []string{"run"}})
	if err != nil {
		t.Fatal(err)
	}
	files := readTar(t, buf.Bytes())
	var manifest []manifestEntry
	if err := json.Unmarshal(files["manifest.json"].body, &manifest); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(manifest) != 1 || len(manifest[0].Layers) != 1 || len(manifest[0].RepoTags) != 2 {
		t.Fatalf("manifest %+v: want one image, one layer, two tags", manifest)
	}
	var config imageConfig
	if err := json.Unmarshal(files[manifest[0].Config].body, &config); err != nil {
		t.Fatalf("config %s: %v", manifest[0].Config, err)
	}
	layer := files[manifest[0].Layers[0]].body
	sum := sha256.Sum256(layer)
	if want := "sha256:" + hex.EncodeToString(sum[:]); len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != want {
		t.Errorf("diff_ids %v, want [%s]", config.RootFS.DiffIDs, want)
	}
	if config.Config.Entrypoint[0] != "/usr/local/bin/agent" || config.Config.Cmd[0] != "run" || config.OS != "linux" {
		t.Errorf("config %+v", config)
	}
	entries := readTar(t, layer)
	for name, want := range map[string]byte{"etc/": tar.TypeDir, "etc/hello": tar.TypeReg, "bin": tar.TypeSymlink,
		"usr/": tar.TypeDir, "usr/local/": tar.TypeDir, "usr/local/bin/": tar.TypeDir, "usr/local/bin/agent": tar.TypeReg, "usr/bin/sh": tar.TypeSymlink} {
		e, ok := entries[name]
		if !ok || e.hdr.Typeflag != want {
			t.Errorf("layer entry %s: %+v, want type %c", name, e.hdr, want)
		}
	}
	// A file under the root's link bin -> usr/bin goes through the link.
	if e, ok := entries["bin/"]; ok {
		t.Errorf("layer has a directory bin/ (%+v) that replaces the link bin -> usr/bin", e.hdr)
	}
	if e := entries["usr/local/bin/agent"]; e.hdr.Mode&0o111 == 0 || e.hdr.Uid != 0 || string(e.body) != "#!/bin/true\n" {
		t.Errorf("agent entry: mode %o uid %d body %q", e.hdr.Mode, e.hdr.Uid, e.body)
	}
	var again bytes.Buffer
	if err := Write(&again, Spec{Tags: []string{"x:1", "x:2"}, Root: root,
		Files: map[string]string{"/usr/local/bin/agent": bin, "/bin/agent2": bin}, Links: map[string]string{"/usr/bin/sh": "busybox"},
		Entrypoint: []string{"/usr/local/bin/agent"}, Cmd: []string{"run"}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again.Bytes(), buf.Bytes()) {
		t.Error("the same inputs gave a different archive")
	}
}

type entry struct {
	hdr  *tar.Header
	body []byte
}

func readTar(t *testing.T, b []byte) map[string]entry {
	t.Helper()
	out := map[string]entry{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = entry{h, body}
	}
}
