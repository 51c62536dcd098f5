// Renders an Ollama Modelfile TEMPLATE the way Ollama's template package does (template/template.go), as an
// oracle for codetune's templates. Reads {"template": string, "cases": [{"prompt", "suffix"}]} on stdin and
// writes the rendered strings as a JSON list.
//
// Ollama's rules reproduced here: parse with Go's text/template, option missingkey=zero and a `json` function;
// a template that mentions neither .Messages nor .Response gets `{{ .Response }}` appended; a request with both
// a prompt and a suffix executes with {Prompt, Suffix, Response: ""}; any other request takes the legacy path,
// {System: "", Prompt, Response: ""} (the legacy path also cuts the template after .Response, which changes
// nothing for templates whose only .Response is the appended last node - checked below).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type request struct {
	Template string `json:"template"`
	Cases    []struct {
		Prompt string `json:"prompt"`
		Suffix string `json:"suffix"`
	} `json:"cases"`
}

func identifiers(node parse.Node, into map[string]bool) {
	switch n := node.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				identifiers(c, into)
			}
		}
	case *parse.ActionNode:
		identifiers(n.Pipe, into)
	case *parse.IfNode:
		identifiers(&n.BranchNode, into)
	case *parse.RangeNode:
		identifiers(&n.BranchNode, into)
	case *parse.WithNode:
		identifiers(&n.BranchNode, into)
	case *parse.BranchNode:
		identifiers(n.Pipe, into)
		identifiers(n.List, into)
		if n.ElseList != nil {
			identifiers(n.ElseList, into)
		}
	case *parse.TemplateNode:
		identifiers(n.Pipe, into)
	case *parse.PipeNode:
		if n != nil {
			for _, c := range n.Cmds {
				for _, a := range c.Args {
					identifiers(a, into)
				}
			}
		}
	case *parse.FieldNode:
		for _, id := range n.Ident {
			into[strings.ToLower(id)] = true
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fail(err)
	}
	vars := map[string]bool{}
	identifiers(tmpl.Tree.Root, vars)
	if vars["response"] {
		fail(fmt.Errorf("template uses .Response: the legacy cut after .Response is not reproduced here"))
	}
	if !vars["messages"] {
		tmpl, err = template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template + "{{ .Response }}")
		if err != nil {
			fail(err)
		}
	}
	out := []string{}
	for _, c := range req.Cases {
		var data map[string]any
		if c.Prompt != "" && c.Suffix != "" {
			data = map[string]any{"Prompt": c.Prompt, "Suffix": c.Suffix, "Response": "", "Think": false, "IsThinkSet": false}
		} else {
			data = map[string]any{"System": "", "Prompt": c.Prompt, "Response": "", "Think": false, "IsThinkSet": false}
		}
		var b strings.Builder
		if err := tmpl.Execute(&b, data); err != nil {
			fail(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}
