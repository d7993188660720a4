// Package version holds the build version, set by the Makefile with -ldflags.
package version

// Version is the vunet version; "dev" when built without the Makefile.
var Version = "dev"
