# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_iot_cognito_relay_global_optspecs
    string join \n h/help V/version
end

function __fish_iot_cognito_relay_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_iot_cognito_relay_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_iot_cognito_relay_using_subcommand
    set -l cmd (__fish_iot_cognito_relay_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -s V -l version -d 'Print version'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "run" -d 'Run the daemon in the foreground (systemd runs this)'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "send" -d 'Publish PAYLOAD, or one message per stdin line, through the daemon; waits for the acks'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "status" -d 'Show the daemon\'s state and counters'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "check-config" -d 'Validate the config and print the effective values'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "config-from-stack" -d 'Turn `aws cloudformation describe-stacks` JSON into a config.toml on stdout'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "subscribe" -d 'Print cloud-to-device messages matching FILTER (one JSON line each), acking each one after it is printed'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "doctor" -d 'Walk the onboarding chain online, as the daemon would, one verdict per step'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "dead-letters" -d 'List, requeue or purge the dead letters: messages the broker never accepted'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand run" -l config -d 'The config file' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l socket -d 'The daemon\'s socket (default: the config\'s socket.path)' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l config -d 'The config whose socket.path to use' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l topic -d 'Relative topic; the daemon adds <identity_pool_id>/<identity_id>/' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l qos -d '1: kept until IoT Core acknowledges it; 0: sent once' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l ttl -d 'Drop it unpublished once it waited this many seconds in the daemon' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l priority -d 'high: published before every waiting normal message' -r -f -a "high\t''
normal\t''"
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l timeout -d 'Give up (exit 1) when the daemon owes an answer, or does not read, for this long' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l conflate -d 'Keep only the newest waiting conflating message of the topic'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -l json -d 'Inputs are whole protocol lines (see docs/protocol.md) instead of payloads'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand send" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand status" -l socket -d 'The daemon\'s socket (default: the config\'s socket.path)' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand status" -l config -d 'The config whose socket.path to use' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand status" -l timeout -d 'Give up (exit 1) when the daemon has not answered within this long' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand status" -l json -d 'Print the raw JSON object'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand check-config" -l config -d 'The config file' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand check-config" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand config-from-stack" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand subscribe" -l socket -d 'The daemon\'s socket (default: the config\'s socket.path)' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand subscribe" -l config -d 'The config whose socket.path to use' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand subscribe" -l count -d 'Exit 0 after N messages (default: run until the daemon stops)' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand subscribe" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand doctor" -l config -d 'The config file' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand doctor" -l json -d 'One JSON object: {"steps":[{"step","verdict","detail"|"cause","fix"|"reason"}]}'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand doctor" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand dead-letters" -l socket -d 'The daemon\'s socket (default: the config\'s socket.path)' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand dead-letters" -l config -d 'The config whose socket.path to use' -r -F
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand dead-letters" -l timeout -d 'Give up (exit 1) when the daemon has not answered within this long' -r
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand dead-letters" -l json -d 'Print the daemon\'s raw JSON answer'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand dead-letters" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "run" -d 'Run the daemon in the foreground (systemd runs this)'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "send" -d 'Publish PAYLOAD, or one message per stdin line, through the daemon; waits for the acks'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "status" -d 'Show the daemon\'s state and counters'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "check-config" -d 'Validate the config and print the effective values'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "config-from-stack" -d 'Turn `aws cloudformation describe-stacks` JSON into a config.toml on stdout'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "subscribe" -d 'Print cloud-to-device messages matching FILTER (one JSON line each), acking each one after it is printed'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "doctor" -d 'Walk the onboarding chain online, as the daemon would, one verdict per step'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "dead-letters" -d 'List, requeue or purge the dead letters: messages the broker never accepted'
complete -c iot-cognito-relay -n "__fish_iot_cognito_relay_using_subcommand help; and not __fish_seen_subcommand_from run send status check-config config-from-stack subscribe doctor dead-letters help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
