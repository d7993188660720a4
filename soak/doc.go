// Package soak holds vunet's churn test: mock frontends connect, carry
// guest traffic through the real appliance and disconnect mid-transfer,
// over and over, and the appliance's file descriptors, goroutines and
// memory must come back to where they were. The package has no code of its
// own; see soak_test.go. VUNET_SOAK sets the duration (make test: SOAK).
package soak
