namespace Distributed.Core;

/// <summary>
/// An error caused by the user's input (a config key, a file, a checkpoint) rather than by a bug.
/// Its message is complete on one line and names what is wrong; the CLI prints it without a stack trace.
/// </summary>
public class UserFacingException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// An error that every attempt hits the same way (bad input, a full disk): a restart cannot fix it, so a job that
/// meets one stops with its reason instead of restarting (a lost peer, by contrast, is not one of these).
/// </summary>
public class DeterministicException(string message, Exception? inner = null) : UserFacingException(message, inner);

/// <summary>A config key with a wrong name, type or value.</summary>
public sealed class ConfigException(string message) : DeterministicException(message);

/// <summary>A checkpoint that is missing, corrupt, or does not fit the model.</summary>
public sealed class CheckpointException(string message, Exception? inner = null) : DeterministicException(message, inner);

/// <summary>Text that a tokenizer cannot take: a corpus that is not Unicode, a character the vocabulary lacks, a vocabulary that repeats one.</summary>
public sealed class DataException(string message) : DeterministicException(message);

/// <summary>The disk filled up (ENOSPC, or a quota) while a file was written; the file was removed again.</summary>
public sealed class DiskFullException(string message, IOException inner) : DeterministicException(message, inner)
{
    const int ENOSPC = 28, EDQUOT = 122;                                      // Linux errno values: .NET's IOException.HResult on Unix
    const int ERROR_HANDLE_DISK_FULL = 39, ERROR_DISK_FULL = 112;             // Windows

    /// <summary>What filled up, as the OS names it (ENOSPC, EDQUOT, ERROR_DISK_FULL); null when <paramref name="e"/> is another error.</summary>
    public static string? Cause(IOException e) => OperatingSystem.IsWindows()
        ? (e.HResult & 0xFFFF) switch { ERROR_DISK_FULL => "ERROR_DISK_FULL", ERROR_HANDLE_DISK_FULL => "ERROR_HANDLE_DISK_FULL", _ => null }
        : e.HResult switch { ENOSPC => "ENOSPC: no space left on device", EDQUOT => "EDQUOT: disk quota exceeded", _ => null };
}
