//! Process tests live in tests/.
