namespace Distributed.Tests;

/// <summary>
/// A test that needs a program from a Debian package (chromium, tmux). `.ci/run` installs them and lists those it
/// installed in $DTRAIN_TOOLS; a tool missing from the machine skips the test with the reason, unless that list
/// names it (then the test runs and fails: CI never skips one silently).
/// </summary>
public sealed class ToolFactAttribute : FactAttribute
{
    public const string InstalledVariable = "DTRAIN_TOOLS";

    public ToolFactAttribute(string tool)
    {
        if (Find(tool) is not null) return;
        bool promised = (Environment.GetEnvironmentVariable(InstalledVariable) ?? "").Split(' ', StringSplitOptions.RemoveEmptyEntries).Contains(tool);
        if (!promised) Skip = $"'{tool}' is not installed (apt-get install {tool}; .ci/run installs it)";
    }

    public static string? Find(string tool) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, tool)).FirstOrDefault(File.Exists);
}
