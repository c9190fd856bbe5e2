// Package imagebuild writes container images without a registry or a
// container engine: a docker-archive tar (the format of `docker save`, which
// `ctr images import` and `docker load` read) holding one layer made from a
// root directory plus single files, an image config and a manifest.
package imagebuild

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"
)

// Spec describes an image.
type Spec struct {
	// Tags name the image, e.g. "svcnat:latest" or
	// "registry.k8s.io/e2e-test-images/agnhost:2.66.1".
	Tags []string
	// Root is a directory whose tree becomes the image's file system; empty
	// for none.
	Root string
	// Files are added on top of Root: image path => file on this machine.
	// Parent directories are created.
	Files map[string]string
	// Links are symbolic links added on top: image path => target.
	Links      map[string]string
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
}

// Write writes the image as a docker-archive tar to w.
func Write(w io.Writer, s Spec) error {
	if len(s.Tags) == 0 {
		return fmt.Errorf("write image: no tag")
	}
	layer, err := os.CreateTemp("", "imagebuild-layer-")
	if err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	defer os.Remove(layer.Name())
	defer layer.Close()
	h := sha256.New()
	if err := writeLayer(io.MultiWriter(layer, h), s); err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	diffID := "sha256:" + hex.EncodeToString(h.Sum(nil))
	size, err := layer.Seek(0, io.SeekCurrent)
	if err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	config, err := json.Marshal(imageConfig{
		Architecture: "amd64",
		OS:           "linux",
		Config: containerConfig{
			Entrypoint: s.Entrypoint,
			Cmd:        s.Cmd,
			Env:        append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, s.Env...),
			WorkingDir: s.WorkingDir,
		},
		RootFS: rootFS{Type: "layers", DiffIDs: []string{diffID}},
	})
	if err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	configName := digestHex(sha256.New(), config) + ".json"
	layerName := strings.TrimPrefix(diffID, "sha256:") + "/layer.tar"
	manifest, err := json.Marshal([]manifestEntry{{Config: configName, RepoTags: s.Tags, Layers: []string{layerName}}})
	if err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	if _, err := layer.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	tw := tar.NewWriter(w)
	if err := addBytes(tw, configName, config); err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	if err := tw.WriteHeader(&tar.Header{Name: layerName, Mode: 0o644, Size: size, Typeflag: tar.TypeReg, ModTime: epoch}); err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	if _, err := io.Copy(tw, layer); err != nil {
		return fmt.Errorf("write image %s: copy layer: %w", s.Tags[0], err)
	}
	if err := addBytes(tw, "manifest.json", manifest); err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("write image %s: %w", s.Tags[0], err)
	}
	return nil
}

// WriteFile writes the image to a file.
func WriteFile(file string, s Spec) error {
	f, err := os.Create(file)
	if err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	if err := Write(f, s); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// A fixed time for every entry, so the same inputs give the same image.
var epoch = time.Unix(0, 0)

func digestHex(h hash.Hash, b []byte) string {
	h.Write(b)
	return hex.EncodeToString(h.Sum(nil))
}

func addBytes(tw *tar.Writer, name string, b []byte) error {
	if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg, ModTime: epoch}); err != nil {
		return err
	}
	_, err := tw.Write(b)
	return err
}

// writeLayer writes the layer tar: Root's tree, then Files and Links with
// the directories they need, owned by root.
func writeLayer(w io.Writer, s Spec) error {
	tw := tar.NewWriter(w)
	dirs := map[string]bool{}
	if s.Root != "" {
		err := filepath.WalkDir(s.Root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(s.Root, p)
			if err != nil || rel == "." {
				return err
			}
			// A link to a directory stands for it (bin -> usr/bin on
			// merged-/usr roots): no directory entry may replace it.
			if d.IsDir() || d.Type()&fs.ModeSymlink != 0 {
				dirs[filepath.ToSlash(rel)] = true
			}
			return addPath(tw, filepath.ToSlash(rel), p)
		})
		if err != nil {
			return fmt.Errorf("add root %s: %w", s.Root, err)
		}
	}
	mkdirs := func(name string) error {
		var parents []string
		for d := path.Dir(name); d != "." && d != "/" && !dirs[d]; d = path.Dir(d) {
			parents = append(parents, d)
		}
		slices.Reverse(parents)
		for _, d := range parents {
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Name: d + "/", Mode: 0o755, Typeflag: tar.TypeDir, ModTime: epoch}); err != nil {
				return err
			}
		}
		return nil
	}
	for _, dst := range sortedKeys(s.Files) {
		name := strings.TrimPrefix(path.Clean(dst), "/")
		if err := mkdirs(name); err != nil {
			return err
		}
		if err := addPath(tw, name, s.Files[dst]); err != nil {
			return fmt.Errorf("add %s as %s: %w", s.Files[dst], dst, err)
		}
	}
	for _, dst := range sortedKeys(s.Links) {
		name := strings.TrimPrefix(path.Clean(dst), "/")
		if err := mkdirs(name); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Linkname: s.Links[dst], Mode: 0o777, Typeflag: tar.TypeSymlink, ModTime: epoch}); err != nil {
			return fmt.Errorf("add link %s: %w", dst, err)
		}
	}
	return tw.Close()
}

// addPath adds the file, directory or symbolic link at src as name.
func addPath(tw *tar.Writer, name, src string) error {
	fi, err := os.Lstat(src)
	if err != nil {
		return err
	}
	link := ""
	if fi.Mode()&fs.ModeSymlink != 0 {
		if link, err = os.Readlink(src); err != nil {
			return err
		}
	}
	hdr, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return err
	}
	hdr.Name = name
	if fi.IsDir() {
		hdr.Name += "/"
	}
	hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname = 0, 0, "root", "root"
	hdr.ModTime, hdr.AccessTime, hdr.ChangeTime = epoch, time.Time{}, time.Time{}
	hdr.Format = tar.FormatPAX
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(tw, f)
	return err
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

type imageConfig struct {
	Architecture string          `json:"architecture"`
	OS           string          `json:"os"`
	Config       containerConfig `json:"config"`
	RootFS       rootFS          `json:"rootfs"`
}

type containerConfig struct {
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	Env        []string `json:"Env,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
}

type rootFS struct {
	Type    string   `json:"type"`
	DiffIDs []string `json:"diff_ids"`
}

type manifestEntry struct {
	Config   string
	RepoTags []string
	Layers   []string
}
