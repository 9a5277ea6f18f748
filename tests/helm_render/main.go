// helm_render renders a Helm chart the way `helm template` does, for machines where helm is not
// installable. It is a faithful subset of helm.sh/helm/v3/pkg/engine and pkg/chartutil:
//
//   - Go text/template with Sprig's TxtFuncMap minus env/expandenv, plus Helm's toYaml, fromYaml,
//     fromYamlArray, toJson, fromJson, fromJsonArray, include, tpl, required, lookup (always empty, as
//     with `helm template`), with missingkey=zero and "<no value>" removed afterwards;
//   - values: the chart's values.yaml coalesced with -f files in order (later wins, null deletes a key),
//     parsed with the same YAML→JSON path as Helm (ghodss/yaml, which sigs.k8s.io/yaml forks), so numbers
//     are float64 as in Helm;
//   - .Chart (Chart.yaml metadata as a struct, field names as in Helm), .Release, .Capabilities
//     (KubeVersion, APIVersions.Has), .Template.Name/.BasePath; every template under templates/ is parsed
//     into one set, partials (_*) are not emitted, empty output is dropped.
//
// Not implemented (the chart must not use them): subcharts, .Files, values templates, toToml, strict mode.
//
// Usage: helm_render [-f values.yaml]... [--name R] [--namespace N] [--kube-version 1.30.0]
//
//	[--values-out merged.json [--values-only]] CHART_DIR
//
// The schema check (values.schema.json) is left to the caller: tests/test_helm.py runs it on --values-out.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"github.com/ghodss/yaml"
)

// Metadata mirrors helm.sh/helm/v3/pkg/chart.Metadata (what .Chart is in a template).
type Metadata struct {
	Name         string            `json:"name,omitempty"`
	Home         string            `json:"home,omitempty"`
	Sources      []string          `json:"sources,omitempty"`
	Version      string            `json:"version,omitempty"`
	Description  string            `json:"description,omitempty"`
	Keywords     []string          `json:"keywords,omitempty"`
	Maintainers  []interface{}     `json:"maintainers,omitempty"`
	Icon         string            `json:"icon,omitempty"`
	APIVersion   string            `json:"apiVersion,omitempty"`
	Condition    string            `json:"condition,omitempty"`
	Tags         string            `json:"tags,omitempty"`
	AppVersion   string            `json:"appVersion,omitempty"`
	Deprecated   bool              `json:"deprecated,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
	KubeVersion  string            `json:"kubeVersion,omitempty"`
	Dependencies []interface{}     `json:"dependencies,omitempty"`
	Type         string            `json:"type,omitempty"`
}

// KubeVersion and VersionSet mirror chartutil's Capabilities pieces.
type KubeVersion struct {
	Version string
	Major   string
	Minor   string
}

func (kv *KubeVersion) String() string     { return kv.Version }
func (kv *KubeVersion) GitVersion() string { return kv.Version }

type VersionSet []string

func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
	HelmVersion map[string]string
}

// The API versions a current cluster serves (what `helm template` assumes without a cluster), plus
// anything given with --api-versions.
var defaultAPIVersions = []string{
	"v1", "apps/v1", "batch/v1", "autoscaling/v1", "autoscaling/v2", "policy/v1",
	"networking.k8s.io/v1", "rbac.authorization.k8s.io/v1", "storage.k8s.io/v1", "node.k8s.io/v1",
	"apiextensions.k8s.io/v1", "admissionregistration.k8s.io/v1", "coordination.k8s.io/v1",
	"scheduling.k8s.io/v1", "discovery.k8s.io/v1",
}

const warnStart, warnEnd = "HELM_ERR_START", "HELM_ERR_END"

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var valueFiles, apiVersions multiFlag
	flag.Var(&valueFiles, "f", "values file (repeatable; later files win)")
	flag.Var(&apiVersions, "api-versions", "extra API version for .Capabilities.APIVersions (repeatable)")
	name := flag.String("name", "release-name", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.30.0", "Kubernetes version for .Capabilities")
	valuesOut := flag.String("values-out", "", "write the coalesced values here as JSON (for schema checks)")
	valuesOnly := flag.Bool("values-only", false, "stop after --values-out (helm checks the schema before rendering)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm_render [-f values.yaml]... CHART_DIR")
		os.Exit(2)
	}
	out, vals, err := render(flag.Arg(0), valueFiles, *name, *namespace, *kubeVersion, apiVersions, *valuesOnly)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	if *valuesOut != "" {
		data, _ := json.MarshalIndent(vals, "", "  ")
		if err := os.WriteFile(*valuesOut, data, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "Error:", err)
			os.Exit(1)
		}
	}
	os.Stdout.WriteString(out)
}

func readYAMLMap(file string) (map[string]interface{}, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	if m == nil {
		m = map[string]interface{}{}
	}
	return m, nil
}

// mergeMaps is helm's cli/values.mergeMaps: user -f files, later ones win, nested maps merge.
func mergeMaps(a, b map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(a))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		if v, ok := v.(map[string]interface{}); ok {
			if bv, ok := out[k]; ok {
				if bv, ok := bv.(map[string]interface{}); ok {
					out[k] = mergeMaps(bv, v)
					continue
				}
			}
		}
		out[k] = v
	}
	return out
}

// coalesce is chartutil.CoalesceTables for the root chart: user values (dst) over chart defaults (src);
// a user null removes the key.
func coalesce(dst, src map[string]interface{}) map[string]interface{} {
	if dst == nil {
		dst = map[string]interface{}{}
	}
	for key, val := range src {
		if dv, ok := dst[key]; ok && dv == nil {
			delete(dst, key)
		} else if !ok {
			dst[key] = val
		} else if istable(val) {
			if istable(dv) {
				coalesce(dv.(map[string]interface{}), val.(map[string]interface{}))
			} else {
				fmt.Fprintf(os.Stderr, "warning: cannot overwrite table with non table for %s (%v)\n", key, val)
			}
		} else if istable(dv) && val != nil {
			fmt.Fprintf(os.Stderr, "warning: destination for %s is a table. Ignoring non-table value (%v)\n", key, val)
		}
	}
	// Nulls the user set for keys the chart lacks are dropped too.
	for key, val := range dst {
		if val == nil {
			delete(dst, key)
		}
	}
	return dst
}

func istable(v interface{}) bool { _, ok := v.(map[string]interface{}); return ok }

func render(chartDir string, valueFiles []string, name, namespace, kubeVersion string,
	extraAPIs []string, valuesOnly bool) (string, map[string]interface{}, error) {
	var meta Metadata
	data, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return "", nil, err
	}
	if err := yaml.Unmarshal(data, &meta); err != nil {
		return "", nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	if meta.APIVersion != "v2" || meta.Name == "" || meta.Version == "" {
		return "", nil, errors.New("Chart.yaml: apiVersion v2, name and version are required")
	}
	defaults, err := readYAMLMap(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return "", nil, err
	}
	user := map[string]interface{}{}
	for _, f := range valueFiles {
		m, err := readYAMLMap(f)
		if err != nil {
			return "", nil, err
		}
		user = mergeMaps(user, m)
	}
	vals := coalesce(user, defaults)
	if valuesOnly {
		return "", vals, nil
	}

	kv := strings.TrimPrefix(kubeVersion, "v")
	parts := strings.SplitN(kv, ".", 3)
	if len(parts) < 2 {
		return "", nil, fmt.Errorf("bad --kube-version %q", kubeVersion)
	}
	caps := &Capabilities{
		KubeVersion: KubeVersion{Version: "v" + kv, Major: parts[0], Minor: parts[1]},
		APIVersions: append(VersionSet(defaultAPIVersions), extraAPIs...),
		HelmVersion: map[string]string{"Version": "v3.16.0"},
	}
	top := map[string]interface{}{
		"Chart": &meta,
		"Release": map[string]interface{}{
			"Name": name, "Namespace": namespace, "IsInstall": true, "IsUpgrade": false,
			"Revision": 1, "Service": "Helm",
		},
		"Capabilities": caps,
		"Values":       vals,
	}

	// templates/**: names are "<chart>/templates/<rel path>", as in Helm.
	tpls := map[string]string{}
	tdir := filepath.Join(chartDir, "templates")
	err = filepath.Walk(tdir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(chartDir, p)
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		tpls[path.Join(meta.Name, filepath.ToSlash(rel))] = string(b)
		return nil
	})
	if err != nil {
		return "", nil, err
	}
	basePath := path.Join(meta.Name, "templates")

	t := template.New("gotpl")
	t.Option("missingkey=zero")
	funcs := sprig.TxtFuncMap()
	delete(funcs, "env")
	delete(funcs, "expandenv")
	included := map[string]int{}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		if included[name] > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		included[name]++
		var buf strings.Builder
		err := t.ExecuteTemplate(&buf, name, data)
		included[name]--
		return buf.String(), err
	}
	funcs["tpl"] = func(text string, vals map[string]interface{}) (string, error) {
		// Helm renders the string in a copy of the template set, under the calling template's name.
		clone, err := t.Clone()
		if err != nil {
			return "", err
		}
		tname := "tpl"
		if tv, ok := vals["Template"].(map[string]interface{}); ok {
			if n, ok := tv["Name"].(string); ok {
				tname = n
			}
		}
		if _, err := clone.New(tname).Parse(text); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		var buf strings.Builder
		if err := clone.ExecuteTemplate(&buf, tname, vals); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %w", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	funcs["required"] = func(warn string, val interface{}) (interface{}, error) {
		if val == nil {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		if s, ok := val.(string); ok && s == "" {
			return val, errors.New(warnStart + warn + warnEnd)
		}
		return val, nil
	}
	funcs["lookup"] = func(apiversion, resource, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	funcs["toYaml"] = func(v interface{}) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	funcs["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["fromYamlArray"] = func(s string) []interface{} {
		a := []interface{}{}
		if err := yaml.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	funcs["toJson"] = func(v interface{}) string {
		data, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(data)
	}
	funcs["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	funcs["fromJsonArray"] = func(s string) []interface{} {
		a := []interface{}{}
		if err := json.Unmarshal([]byte(s), &a); err != nil {
			a = []interface{}{err.Error()}
		}
		return a
	}
	t.Funcs(funcs)

	// Helm's order: shallower paths first, then by name.
	keys := make([]string, 0, len(tpls))
	for k := range tpls {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		ci, cj := strings.Count(keys[i], "/"), strings.Count(keys[j], "/")
		if ci == cj {
			return keys[i] > keys[j]
		}
		return ci > cj
	})
	for _, k := range keys {
		if _, err := t.New(k).Parse(tpls[k]); err != nil {
			return "", nil, fmt.Errorf("parse error in (%s): %w", k, err)
		}
	}

	sort.Strings(keys)
	var out bytes.Buffer
	for _, k := range keys {
		base := path.Base(k)
		if strings.HasPrefix(base, "_") {
			continue
		}
		top["Template"] = map[string]interface{}{"Name": k, "BasePath": basePath}
		var buf strings.Builder
		if err := t.ExecuteTemplate(&buf, k, top); err != nil {
			msg := err.Error()
			if i := strings.Index(msg, warnStart); i >= 0 {
				msg = msg[i+len(warnStart):]
				msg = strings.SplitN(msg, warnEnd, 2)[0]
			}
			return "", nil, fmt.Errorf("execution error in (%s): %s", k, msg)
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		if base == "NOTES.txt" {
			// `helm install` prints NOTES.txt; `helm template` does not emit it as a manifest.
			fmt.Fprintf(os.Stderr, "NOTES:\n%s\n", text)
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", k, strings.TrimRight(text, "\n"))
	}
	return out.String(), vals, nil
}
