// Command imagebuild writes a docker-archive image tar from a root directory
// and single files, without a registry or a container engine. Import the
// result with `ctr -n k8s.io images import` or `docker load`.
//
//	imagebuild -o svcnat.tar -tag svcnat:latest -root rootfs \
//	    -add /usr/local/bin/svcnat=bin/svcnat \
//	    -entrypoint /usr/local/bin/svcnat -cmd run
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/svcnat/svcnat/test/imagebuild"
)

// list is a repeatable flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var (
		s                      imagebuild.Spec
		tags, adds, links, env list
		out, entrypoint, cmd   string
	)
	flag.StringVar(&out, "o", "", "output tar file (required)")
	flag.Var(&tags, "tag", "image name and tag (repeatable, at least one)")
	flag.StringVar(&s.Root, "root", "", "directory whose tree becomes the image's file system")
	flag.Var(&adds, "add", "IMAGEPATH=FILE: add a file (repeatable)")
	flag.Var(&links, "link", "IMAGEPATH=TARGET: add a symbolic link (repeatable)")
	flag.Var(&env, "env", "NAME=VALUE: environment of the image (repeatable)")
	flag.StringVar(&entrypoint, "entrypoint", "", "entrypoint, words separated by spaces")
	flag.StringVar(&cmd, "cmd", "", "default arguments, words separated by spaces")
	flag.Parse()
	if out == "" || len(tags) == 0 {
		fmt.Fprintln(os.Stderr, "imagebuild: -o and -tag are required")
		flag.Usage()
		os.Exit(2)
	}
	var err error
	s.Tags, s.Env = tags, env
	s.Entrypoint, s.Cmd = strings.Fields(entrypoint), strings.Fields(cmd)
	if s.Files, err = pairs("add", adds); err == nil {
		s.Links, err = pairs("link", links)
	}
	if err == nil {
		err = imagebuild.WriteFile(out, s)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "imagebuild:", err)
		os.Exit(1)
	}
}

func pairs(flagName string, l list) (map[string]string, error) {
	m := map[string]string{}
	for _, v := range l {
		k, val, ok := strings.Cut(v, "=")
		if !ok || k == "" || val == "" {
			return nil, fmt.Errorf("-%s %q: want IMAGEPATH=VALUE", flagName, v)
		}
		m[k] = val
	}
	return m, nil
}
