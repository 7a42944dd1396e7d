//! The `sepal` binary: the node agent, the lab and the operator commands (see the library).

fn main() -> std::process::ExitCode {
    sepal_agent::main()
}
