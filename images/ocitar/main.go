// Command ocitar writes a container image, one layer made from a directory, as a tarball that
// is both an OCI image layout (oci-layout, index.json, blobs/) and a docker-archive
// (manifest.json with RepoTags), which `ctr images import`, `skopeo copy oci-archive:` /
// `docker-archive:`, `podman load` and `docker load` all read. No Docker engine involved.
//
// The output depends only on the directory's names, modes, link targets and contents: every
// entry is owned by root with time SOURCE_DATE_EPOCH (default 0), so the same inputs give
// the same digests.
//
//	ocitar -o OUT.tar -name REPO:TAG -rootfs DIR [-entrypoint JSON] [-cmd JSON]
//	       [-env K=V]... [-label K=V]... [-user U] [-workdir DIR] [-expose PORT/PROTO]...
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type imageConfig struct {
	User         string              `json:"User,omitempty"`
	ExposedPorts map[string]struct{} `json:"ExposedPorts,omitempty"`
	Env          []string            `json:"Env,omitempty"`
	Entrypoint   []string            `json:"Entrypoint,omitempty"`
	Cmd          []string            `json:"Cmd,omitempty"`
	WorkingDir   string              `json:"WorkingDir,omitempty"`
	Labels       map[string]string   `json:"Labels,omitempty"`
}

type image struct {
	Created      string      `json:"created"`
	Architecture string      `json:"architecture"`
	OS           string      `json:"os"`
	Config       imageConfig `json:"config"`
	RootFS       struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
	History []map[string]string `json:"history"`
}

func main() {
	var (
		out, name, rootfs, entrypoint, cmd, user, workdir string
		envs, labels, expose                              list
	)
	flag.StringVar(&out, "o", "", "output tarball")
	flag.StringVar(&name, "name", "", "image name with an explicit tag (REPO:TAG, never :latest)")
	flag.StringVar(&rootfs, "rootfs", "", "directory that becomes the image's only layer")
	flag.StringVar(&entrypoint, "entrypoint", "", "Entrypoint as a JSON array")
	flag.StringVar(&cmd, "cmd", "", "Cmd as a JSON array")
	flag.StringVar(&user, "user", "", "User (numeric uid[:gid], so runAsNonRoot can check it)")
	flag.StringVar(&workdir, "workdir", "", "WorkingDir")
	flag.Var(&envs, "env", "K=V (repeatable)")
	flag.Var(&labels, "label", "K=V (repeatable)")
	flag.Var(&expose, "expose", "PORT/PROTO (repeatable)")
	flag.Parse()
	if err := run(out, name, rootfs, entrypoint, cmd, user, workdir, envs, labels, expose); err != nil {
		fmt.Fprintf(os.Stderr, "ocitar: %v\n", err)
		os.Exit(1)
	}
}

func run(out, name, rootfs, entrypoint, cmd, user, workdir string, envs, labels, expose list) error {
	if out == "" || name == "" || rootfs == "" || flag.NArg() != 0 {
		return fmt.Errorf("-o, -name and -rootfs are required, and nothing else (see the source's usage)")
	}
	repo, tag, err := splitName(name)
	if err != nil {
		return err
	}
	epoch, err := sourceDateEpoch()
	if err != nil {
		return err
	}

	var layer bytes.Buffer
	if err := writeLayer(&layer, rootfs, epoch); err != nil {
		return fmt.Errorf("layer from %s: %w", rootfs, err)
	}
	layerDigest := digest(layer.Bytes())

	cfg := image{
		Created:      epoch.UTC().Format(time.RFC3339),
		Architecture: runtime.GOARCH,
		OS:           "linux",
		History:      []map[string]string{{"created": epoch.UTC().Format(time.RFC3339), "created_by": "scripts/images.sh (ocitar)"}},
	}
	cfg.Config.User = user
	cfg.Config.WorkingDir = workdir
	cfg.Config.Env = envs
	if cfg.Config.Entrypoint, err = jsonArray("-entrypoint", entrypoint); err != nil {
		return err
	}
	if cfg.Config.Cmd, err = jsonArray("-cmd", cmd); err != nil {
		return err
	}
	for _, kv := range labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("-label %q: expected K=V", kv)
		}
		if cfg.Config.Labels == nil {
			cfg.Config.Labels = map[string]string{}
		}
		cfg.Config.Labels[k] = v
	}
	for _, p := range expose {
		if !strings.Contains(p, "/") {
			return fmt.Errorf("-expose %q: expected PORT/PROTO", p)
		}
		if cfg.Config.ExposedPorts == nil {
			cfg.Config.ExposedPorts = map[string]struct{}{}
		}
		cfg.Config.ExposedPorts[p] = struct{}{}
	}
	for _, kv := range envs {
		if !strings.Contains(kv, "=") {
			return fmt.Errorf("-env %q: expected K=V", kv)
		}
	}
	cfg.RootFS.Type = "layers"
	cfg.RootFS.DiffIDs = []string{layerDigest}
	config, err := json.Marshal(cfg)
	if err != nil {
		return err
	}

	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        descriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: digest(config), Size: int64(len(config))},
		"layers":        []descriptor{{MediaType: "application/vnd.oci.image.layer.v1.tar", Digest: layerDigest, Size: int64(layer.Len())}},
	})
	if err != nil {
		return err
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []descriptor{{
			MediaType: "application/vnd.oci.image.manifest.v1+json",
			Digest:    digest(manifest),
			Size:      int64(len(manifest)),
			Annotations: map[string]string{
				"io.containerd.image.name":          repo + ":" + tag,
				"org.opencontainers.image.ref.name": tag,
			},
			Platform: &platform{Architecture: runtime.GOARCH, OS: "linux"},
		}},
	})
	if err != nil {
		return err
	}
	blob := func(d string) string { return "blobs/sha256/" + strings.TrimPrefix(d, "sha256:") }
	docker, err := json.Marshal([]map[string]any{{
		"Config":   blob(digest(config)),
		"RepoTags": []string{repo + ":" + tag},
		"Layers":   []string{blob(layerDigest)},
	}})
	if err != nil {
		return err
	}

	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	tw := tar.NewWriter(f)
	dirs := []string{"blobs/", "blobs/sha256/"}
	for _, d := range dirs {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{blob(layerDigest), layer.Bytes()},
		{blob(digest(config)), config},
		{blob(digest(manifest)), manifest},
		{"index.json", index},
		{"manifest.json", docker},
	}
	for _, file := range files {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: file.name, Mode: 0o644, Size: int64(len(file.data)), ModTime: epoch}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if _, err := tw.Write(file.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	fmt.Printf("%s %s\n", repo+":"+tag, digest(manifest))
	return nil
}

func splitName(name string) (string, string, error) {
	slash := strings.LastIndex(name, "/")
	colon := strings.LastIndex(name, ":")
	if colon <= slash || colon == len(name)-1 {
		return "", "", fmt.Errorf("-name %q: needs an explicit tag (REPO:TAG)", name)
	}
	repo, tag := name[:colon], name[colon+1:]
	if tag == "latest" {
		return "", "", fmt.Errorf("-name %q: :latest is not allowed; give a version", name)
	}
	return repo, tag, nil
}

func sourceDateEpoch() (time.Time, error) {
	v := os.Getenv("SOURCE_DATE_EPOCH")
	if v == "" {
		return time.Unix(0, 0), nil
	}
	s, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q is not a number of seconds", v)
	}
	return time.Unix(s, 0), nil
}

func jsonArray(flagName, text string) ([]string, error) {
	if text == "" {
		return nil, nil
	}
	var a []string
	if err := json.Unmarshal([]byte(text), &a); err != nil {
		return nil, fmt.Errorf("%s %q: expected a JSON array of strings: %w", flagName, text, err)
	}
	return a, nil
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// writeLayer tars dir (sorted, root-owned, fixed times). Hard links become copies.
func writeLayer(w io.Writer, dir string, epoch time.Time) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(path); err != nil {
				return err
			}
		}
		h, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		h.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			h.Name += "/"
		}
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "", ""
		h.ModTime, h.AccessTime, h.ChangeTime = epoch, time.Time{}, time.Time{}
		h.Format = tar.FormatPAX
		h.PAXRecords = nil
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer f.Close()
			if _, err := io.Copy(tw, f); err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}
