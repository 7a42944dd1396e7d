//go:build tools

// Package networkpolicyapi has no code to build. This file names the packages that
// scripts/kube-build's `go test -c sigs.k8s.io/network-policy-api/conformance` compiles (the
// conformance package and what its test file imports), so that `go mod tidy` keeps the
// requirements and checksums the suite's test binary needs. The tag keeps it out of every build.
package networkpolicyapi

import (
	_ "k8s.io/client-go/kubernetes"
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	_ "k8s.io/client-go/tools/clientcmd"
	_ "sigs.k8s.io/controller-runtime/pkg/client"
	_ "sigs.k8s.io/controller-runtime/pkg/client/config"
	_ "sigs.k8s.io/network-policy-api/apis/v1beta1"
	_ "sigs.k8s.io/network-policy-api/conformance"
	_ "sigs.k8s.io/network-policy-api/conformance/tests"
	_ "sigs.k8s.io/network-policy-api/conformance/utils/flags"
	_ "sigs.k8s.io/network-policy-api/conformance/utils/suite"
)
