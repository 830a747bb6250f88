namespace Distributed.Core;

/// <summary>
/// An error caused by the user's input (a config key, a file, a checkpoint) rather than by a bug.
/// Its message is complete on one line and names what is wrong; the CLI prints it without a stack trace.
/// </summary>
public class UserFacingException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>A config key with a wrong name, type or value.</summary>
public sealed class ConfigException(string message) : UserFacingException(message);

/// <summary>A checkpoint that is missing, corrupt, or does not fit the model.</summary>
public sealed class CheckpointException(string message, Exception? inner = null) : UserFacingException(message, inner);
